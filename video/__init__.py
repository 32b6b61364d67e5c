"""Video and frame-folder I/O, independent of the model: ``reader`` decodes (upright, and says where an input
breaks), ``writer`` encodes (codecs, colour tags), ``audio`` copies sound, ``resume`` keeps checkpoints and
segments, ``scenecut`` finds cuts, ``stream`` runs any engine over a video file with flat memory, ``frames`` reads
and writes PNG/npy folders, ``outputs`` keeps the user's files safe (temporary names, partial results, locks)."""

from .outputs import OutputLock
from .reader import FrameReader, VideoInfo, probe_video, read_frames
from .resume import ResumeFiles, join_segments
from .scenecut import SceneCutDetector
from .stream import check_video_job, upscale_video
from .writer import CODECS, VideoWriter

__all__ = ["CODECS", "FrameReader", "OutputLock", "ResumeFiles", "SceneCutDetector", "VideoInfo", "VideoWriter",
           "check_video_job", "join_segments", "probe_video", "read_frames", "upscale_video"]
