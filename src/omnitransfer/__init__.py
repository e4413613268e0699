"""omnitransfer: spatio-temporal video transfer (OmniTransfer, Video-As-Prompt) over Wan2.1."""

from .errors import InputError
from .pipeline import OmniTransferPipeline, Reference
from .tasks import Task
from .transformer import OmniTransferTransformer
from .video import read_image, read_video, save_video

__all__ = [
    "InputError",
    "OmniTransferPipeline",
    "OmniTransferTransformer",
    "Reference",
    "Task",
    "read_image",
    "read_video",
    "save_video",
]
