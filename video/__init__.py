"""Video and frame-folder I/O, independent of the model: ``reader`` decodes, ``writer`` encodes (codecs, colour
tags), ``audio`` copies sound, ``resume`` keeps checkpoints and segments, ``scenecut`` finds cuts, ``stream`` runs
any engine over a video file with flat memory, ``frames`` reads and writes PNG/npy folders."""

from .reader import FrameReader, VideoInfo, read_frames
from .resume import ResumeFiles, join_segments
from .scenecut import SceneCutDetector
from .stream import upscale_video
from .writer import CODECS, VideoWriter

__all__ = ["CODECS", "FrameReader", "ResumeFiles", "SceneCutDetector", "VideoInfo", "VideoWriter", "join_segments",
           "read_frames", "upscale_video"]
