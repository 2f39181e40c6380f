import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter; it must be chosen before any
# kernel is defined, so here, before the test modules import ktfast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
