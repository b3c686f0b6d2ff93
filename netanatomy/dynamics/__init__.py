"""Width sufficiency (the channel Matthew effect): a training-time tracker of channel
weight norms, an IS / DS / undecided verdict per layer, a width plan and the
re-widened model. See ``docs/dynamics.md``."""

from .groups import ChannelGroup, OutSlice, find_channel_groups
from .posthoc import curves_from_checkpoints
from .record import WidthRecord
from .tracker import WidthTracker

__all__ = [
    "ChannelGroup",
    "OutSlice",
    "WidthRecord",
    "WidthTracker",
    "curves_from_checkpoints",
    "find_channel_groups",
]
