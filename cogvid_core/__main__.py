import os
import sys

# Must precede the first CUDA allocation: expandable segments keep the caching allocator from
# holding GiBs of fragments beyond what is allocated (H100, 1.5 lowvram: 9.27 -> 6.06 GiB reserved).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from .cli import main  # noqa: E402

sys.exit(main())
