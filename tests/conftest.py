import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# As in every chapter (saddle_escape.book): the tensors are tiny and extra threads cost more than
# they save, many times more on a busy 2-core machine.
torch.set_num_threads(int(os.environ.get("SADDLE_ESCAPE_THREADS", "1")))
