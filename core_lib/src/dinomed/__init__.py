"""DINOv3 foundation models for PET/CT and CT segmentation."""
import os as _os

__version__ = "0.1.0"

# torch's CPU allocator asks the kernel for transparent huge pages for its large blocks only when this is set before
# its first allocation. Whole-slice activations are freed and allocated again for every batch; with 4 kB pages each
# costs a page fault per page (measured: ~120k faults per 512x512 slice with the demo model, 30-50x fewer with it).
# A user's own setting wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
