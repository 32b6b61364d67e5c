"""Sequences carried across queue runs, one per upscale node. No ComfyUI import.

V3 node classes are locked, stateless clones, so the state of a sequence lives here, keyed by the node's
unique id. A stored stream is replaced only after a whole batch has been upscaled: a run that fails or is
interrupted loses the frames it computed, but the stream stays where the last successful run left it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..models.shared.errors import UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredStream:
    """model_key: what must not change for a continuation (model, precision, seed, steps, flow model).
    origin: for a run whose result its inputs alone decide (a restart, or a continuation of a ``state`` input), what
    decided it (``batch_origin``); None after a continuation of the node's own stored stream.
    run_start: the frame the run that made it started from (``state.frame_index`` before it).
    run_start_state: the state that run started from, for a chunk that continued the stored stream (see
    ``REDO_MAX_BYTES``): queued again, that chunk is redone from it instead of refused.
    run_end: the frame after that run's last input frame (None where not known), which the state no longer tells
    once the run ended its sequence.
    video: the identity and name of the video whose chunks the sequence upscales (``ChunkStart``), where known.
    """

    model_key: str
    state: Any
    origin: tuple | None = None
    run_start: int = 0
    run_start_state: Any = None
    run_end: int | None = None
    video: tuple[str, str] | None = None


class ChunkStart(int):
    """A chunk's first frame (Load Video Chunk's start_frame) that also says which video it counts frames of:
    ``video`` is ``range.video_identity``'s (identity, name). Stored streams are keyed by node id, and two workflows
    opened from one template have the same node ids: queued in turn with two videos, one node's next chunk would
    otherwise continue the other video's sequence without a word. An int everywhere else, so an INT output; a value
    from any other node simply carries no video. ``chunk_frames``, ``total``: the loader's chunk length and the
    video's frame count, for naming the chunk index to queue next."""

    video: tuple[str, str] | None
    chunk_frames: int | None
    total: int | None

    def __new__(cls, frame: int, video: tuple[str, str] | None = None, chunk_frames: int | None = None,
                total: int | None = None):
        value = super().__new__(cls, frame)
        value.video, value.chunk_frames, value.total = video, chunk_frames, total
        return value

    def __getnewargs__(self):
        # ComfyUI deep-copies a failed node's input values into its history: a copy that cannot be made kills
        # its prompt worker (and pickle needs the same)
        return int(self), self.video, self.chunk_frames, self.total


def same_file(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two video identities (``range.video_identity``) name one file, perhaps changed between them."""
    return "|" in a[0] and a[0].rsplit("|", 2)[0] == b[0].rsplit("|", 2)[0]


def chunk_video(start_frame: Any) -> tuple[str, str] | None:
    """The (identity, name) of the video a start_frame input counts frames of, where it came from Load Video Chunk."""
    return getattr(start_frame, "video", None)


# A chunk whose frames reached no node (a later node failed, or the queue was cancelled after it) can be queued again
# and redone from the state it started from, which is kept beside the stored stream up to this size; FlashVSR's
# attention cache at high resolutions is far bigger (30 GB at a 4K output), and a second copy of it in RAM is not
# worth that convenience.
REDO_MAX_BYTES = 2 << 30


def redo_state(start: Any, state_input: Any, start_frame: int | None) -> Any:
    """The ``run_start_state`` of a run that started from ``start``: kept for a chunk that continued the stored
    stream (``start_frame`` > 0, no ``state`` input), where a redo needs it; a first chunk restarts anyway."""
    return start if state_input is None and start_frame else None


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a state (dataclasses, sequences and dicts of them; shared storage counted once)."""
    seen, total, todo = set(), 0, [state]
    while todo:
        item = todo.pop()
        if torch.is_tensor(item):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            todo.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
    return total


class StreamStore:
    """node id -> StoredStream, at most ``capacity`` nodes, for the upscale node called ``node_name``, whose states
    are ``state_type``. Over capacity the least recently used stream that holds no frames back is dropped
    (``pending(state)``: frames a state holds back), else the least recently used; a node whose stream was dropped
    is told so when it continues it, and refused where frames were lost with it.

    ``version`` changes whenever a run replaces a stream in a way that a cached result of a run that depends on
    its inputs alone could no longer reproduce (see ``fingerprint``), so ComfyUI's output cache never skips a run
    whose side effect on the store is still needed.
    """

    def __init__(self, node_name: str, state_type: type, capacity: int = 8,
                 pending: Callable[[Any], int] | None = None, settings: str = "model, precision, seed or settings"):
        self.node_name, self.state_type = node_name, state_type
        self.settings = settings  # what model_key covers, as the messages name it
        self.capacity = capacity
        self.pending = pending
        self.version = 0
        self._streams: OrderedDict[str, StoredStream] = OrderedDict()
        self._dropped: OrderedDict[str, int] = OrderedDict()  # node id -> frames its dropped stream held back
        self._lock = threading.Lock()

    def _held(self, stream: StoredStream) -> int:
        return self.pending(stream.state) if self.pending is not None else 0

    def get(self, node_id: str) -> StoredStream | None:
        with self._lock:
            return self._streams.get(node_id)

    def put(self, node_id: str, stream: StoredStream) -> None:
        # so that a state handed on is checked against its settings, and named by what made it
        state_token(stream.state, stream.model_key, stream.origin)
        if stream.run_start_state is not None and state_bytes(stream.run_start_state) > REDO_MAX_BYTES:
            stream = dataclasses.replace(stream, run_start_state=None)
        with self._lock:
            previous = self._streams.pop(node_id, None)
            # A cached result stands for the stream that its run left, so it is invalidated when a stream that
            # a run of decided inputs made (a restart, a state handed on) is replaced by another: by a run of
            # other inputs, or by a continuation. Not by a continuation of a continuation (a cached restart result
            # of this node is older than the first continuation, which moved the version on already), nor by the
            # same run again: so a chunk queued again, a workflow that hands one node's state to another and the
            # other upscale nodes of the workflow are served from the cache, and not upscaled (and saved) again
            # on every queue run while one node walks through a video.
            if previous is not None and previous.origin is not None and previous.origin != stream.origin:
                self.version += 1
            self._streams[node_id] = stream
            self._dropped.pop(node_id, None)
            while len(self._streams) > self.capacity:
                dropped = next((k for k, v in self._streams.items() if not self._held(v)), None)
                dropped = dropped if dropped is not None else next(iter(self._streams))
                held = self._held(self._streams.pop(dropped))
                self._dropped[dropped] = held
                while len(self._dropped) > 256:
                    self._dropped.popitem(last=False)
                # A cached result of that node's last run no longer stands for a stream in the store
                self.version += 1
                lost = f", and with it the {held} frames it held back" if held else ""
                log.warning("StreamVSR: dropped the stored sequence of node %s%s (more than %d %s nodes keep one)",
                            dropped, lost, self.capacity, self.node_name)

    def _dropped_reason(self, node_id: str) -> tuple[str | None, int]:
        """Why node ``node_id`` has no stored stream, where it had one that was dropped (else None), and the
        frames held back that went with it."""
        with self._lock:
            if node_id not in self._dropped:
                return None, 0
            held = self._dropped[node_id]
        lost = f" together with the {held} frames it held back for look-ahead," if held else ""
        return (f"its stored sequence was dropped{lost} because more than {self.capacity} {self.node_name} nodes "
                "kept one; use fewer such nodes at a time"), held

    def clear(self) -> None:
        with self._lock:
            self._streams.clear()
            self._dropped.clear()
            self.version += 1

    def fingerprint(self, continue_sequence: bool | None):
        """Value for ``fingerprint_inputs``: NaN (never cached) when continuing, and when ``continue_sequence`` comes
        through a link (None: ComfyUI hands that method a linked input's value unknown). (It hands it no node id
        either, so the version is the store's, not the node's.)"""
        return float("nan") if continue_sequence is None or continue_sequence else ("restart", self.version)

    def start_state(self, node_id: str, model_key: str, size: tuple[int, int], fresh: Callable[[], Any],
                    continue_sequence: bool, state: Any = None, start_frame: int | None = None,
                    pending: Callable[[Any], int] | None = None, notify: Callable[[str], None] | None = None) -> Any:
        """The state the next batch of node ``node_id`` starts from (``fresh()`` for a new sequence); logs why a
        continuation restarts. States are an engine's (``models/contract.py``): they have ``lr_size`` and
        ``frame_index`` (0 after a sequence was ended, e.g. by FlashVSR's last chunk). ``pending(state)``: frames
        a state holds back (the engine's ``pending``), named in the log when such a state is dropped.
        ``notify(text)``: shows a warning the user must see on the node (a chunk upscaled a second time).

        ``start_frame`` (from a chunk loader) replaces ``continue_sequence``: 0 starts a new sequence, any other
        value continues the stored one, which must have ended at exactly that frame (else an error says which
        chunk to queue), so a chunk can be neither skipped nor applied twice."""
        if state is not None:
            if not isinstance(state, self.state_type):
                raise UserInputError(f"the state input of {self.node_name} comes from another kind of upscale node; "
                                     f"connect the state output of a {self.node_name} node, or disconnect it")
            made_with = state_key(state)
            if made_with is not None and made_with != model_key:
                raise UserInputError(f"the state input was made with another {self.settings} "
                                     f"than this {self.node_name} node has: give both nodes the same ones, or "
                                     "disconnect the state input to start a new sequence")
            if state.lr_size is not None and tuple(state.lr_size) != tuple(size):
                raise UserInputError(
                    f"the state input belongs to frames of {state.lr_size[1]}x{state.lr_size[0]} but these "
                    f"frames are {size[1]}x{size[0]}: disconnect the state input to start a new sequence")
            if start_frame is not None and int(start_frame) != state.frame_index:
                raise UserInputError(f"the state input ended its sequence at frame {state.frame_index}, but "
                                     f"start_frame says this chunk starts at frame {int(start_frame)}: connect one "
                                     "of the two, not both")
            if state.frame_index == 0:
                # as continue_sequence does: the same frames and seed give the same result whichever way they came
                log.info("StreamVSR: the state input ended its sequence (last chunk); node %s starts a new one",
                         node_id)
                return fresh()
            return state
        if start_frame is not None:
            return self._chunk_start(node_id, model_key, size, fresh, int(start_frame), notify,
                                     chunk_video(start_frame), getattr(start_frame, "chunk_frames", None),
                                     getattr(start_frame, "total", None))
        if not continue_sequence:
            return fresh()
        stored = self.get(node_id)
        if stored is not None and stored.state.frame_index == 0:
            log.warning("StreamVSR: the last run of node %s ended its sequence (last chunk); starting a new "
                        "sequence", node_id)
            return fresh()
        dropped, frames_lost = self._dropped_reason(node_id) if stored is None else (None, 0)
        if frames_lost:
            raise UserInputError(f"{self.node_name} node {node_id} cannot continue its sequence: {dropped}. Set "
                                 "continue_sequence to restart and queue the frames again from the start")
        if dropped is not None:
            log.warning("StreamVSR: node %s cannot continue its sequence: %s; starting a new sequence", node_id,
                        dropped)
            return fresh()
        if stored is None:
            log.info("StreamVSR: node %s has no previous run to continue; starting a new sequence", node_id)
            return fresh()
        if stored.model_key != model_key:
            changed = f"the {self.settings} changed"
        elif stored.state.lr_size is not None and tuple(stored.state.lr_size) != tuple(size):
            changed = (f"the frame size changed from {stored.state.lr_size[1]}x{stored.state.lr_size[0]} to "
                       f"{size[1]}x{size[0]}")
        else:
            log.info("StreamVSR: node %s continues its sequence at frame %d", node_id, stored.state.frame_index)
            return stored.state
        held = pending(stored.state) if pending is not None else 0
        if held:
            # (a restart would drop them unseen: the user decides)
            raise UserInputError(f"{self.node_name} node {node_id} cannot continue its sequence: {changed} since "
                                 f"its last run, which holds back its last {held} frames for look-ahead. To have "
                                 "them, queue the rest of the video with the earlier settings and last_chunk on; to "
                                 "start a new sequence without them, set continue_sequence to restart")
        log.warning("StreamVSR: %s since the last run of node %s; starting a new sequence", changed, node_id)
        return fresh()

    def _chunk_start(self, node_id, model_key, size, fresh, start_frame: int, notify=None, video=None,
                     chunk_frames=None, total=None):
        if start_frame == 0:
            return fresh()
        stored = self.get(node_id)
        where = f"this chunk starts at frame {start_frame}"
        if stored is None:
            dropped, _ = self._dropped_reason(node_id)
            if dropped is not None:
                raise UserInputError(f"{where}, but {dropped}: set the chunk index to 0 and queue again from there")
            raise UserInputError(f"{where}, but this node has no earlier chunk to continue (after a restart of "
                                 "ComfyUI, or a first run): set the chunk index to 0 and queue again from there. "
                                 "(Where ComfyUI's setting 'Widget control mode' is 'before', the index moves on "
                                 "before each run, so chunk 0 never runs: set it to 'after')")
        if video is not None and (stored.video is None or video[0] != stored.video[0]):
            if stored.video is not None and same_file(video, stored.video):
                raise UserInputError(f"{where}, but {video[1]} changed since this node upscaled its earlier chunks: "
                                     "set the chunk index to 0 to start it again")
            name, other = video[1], stored.video[1] if stored.video is not None else None
            if name == other:  # two files of one name (their paths, then), or two videos in memory
                name = video[0].rsplit("|", 2)[0] if "|" in video[0] else "this video"
                other = stored.video[0].rsplit("|", 2)[0] if "|" in stored.video[0] else "another video"
            earlier = (f"this node's earlier chunks were of {other}" if other is not None else
                       "this node's last run upscaled frames that were no chunk of it")
            raise UserInputError(f"{where} of {name}, but {earlier}: a node upscales one video's chunks at a "
                                 "time (two workflows opened from one template have the same node ids, so their "
                                 "upscale nodes share one sequence). Set the chunk index to 0 to start this video "
                                 "again, and queue one video's chunks after the other's")
        if stored.model_key != model_key:
            raise UserInputError(f"{where}, but the model, precision or settings changed since the earlier chunks: "
                                 "set the chunk index to 0 to start the video again with these settings")
        previous, redo = stored.state, stored.run_start_state
        if (start_frame == stored.run_start and previous.frame_index != start_frame and redo is not None
                and redo.frame_index == start_frame and tuple(redo.lr_size) == tuple(size)):
            # (the node cannot tell a chunk queued again after a success from one whose frames were lost)
            text = (f"this node upscaled the chunk at frame {start_frame} already (it is queued again, or a later "
                    "node failed); upscaling it again from the state it started from. If its frames were saved the "
                    "first time, Save Image now saves them a second time")
            log.warning("StreamVSR: node %s: %s", node_id, text)
            if notify is not None:
                notify("warning: " + text)
            return redo
        if previous.frame_index == 0 and stored.run_end == start_frame:
            raise UserInputError(f"{where}, right after the last run of this node, but that run ended the sequence "
                                 "as a last chunk does: connect Load Video Chunk's last_chunk output to this node's "
                                 "last_chunk (left on, every chunk ends the sequence), then set the chunk index to 0 "
                                 "to start again")
        if previous.frame_index == 0:
            raise UserInputError(f"{where}, but the last run of this node ended its sequence (it was the last "
                                 "chunk): set the chunk index to 0 to start again")
        if previous.lr_size is not None and tuple(previous.lr_size) != tuple(size):
            raise UserInputError(f"{where}, but the earlier chunks had frames of {previous.lr_size[1]}x"
                                 f"{previous.lr_size[0]} and these are {size[1]}x{size[0]}: set the chunk index "
                                 "to 0 to start again")
        if previous.frame_index != start_frame and start_frame == stored.run_start:
            raise UserInputError(f"{where}, which this node's last run upscaled already: it moved the sequence on to "
                                 f"frame {previous.frame_index}, but its frames were not kept (a later node failed "
                                 "or the queue was cancelled after it), and the state it started from was too large "
                                 f"to keep (over {REDO_MAX_BYTES >> 30} GB). To have them, set the chunk index to 0 "
                                 "and start the video again; to go on without them, queue "
                                 f"{_next_chunk(previous.frame_index, chunk_frames, total)}")
        if total is not None and previous.frame_index >= total > start_frame:
            held = self._held(stored)
            unseen = (f" (its last {held} frames are still held back for look-ahead, as last_chunk was off: connect "
                      "Load Video Chunk's last_chunk output to this node's last_chunk, so that the last chunk gives "
                      "them)" if held else "")
            raise UserInputError(f"{where}, but this node's sequence reached the end of the video (frame "
                                 f"{previous.frame_index}) with its last chunk{unseen}: set the chunk index to 0 to "
                                 "start again")
        if previous.frame_index != start_frame:
            raise UserInputError(f"{where}, but this node's sequence ended at frame {previous.frame_index}: queue "
                                 f"{_next_chunk(previous.frame_index, chunk_frames)} next (chunks must follow each "
                                 "other without gaps or repeats), or set the chunk index to 0 to start again")
        log.info("StreamVSR: node %s continues its sequence at frame %d", node_id, start_frame)
        return previous


def _next_chunk(frame: int, chunk_frames: int | None, total: int | None = None) -> str:
    """The chunk of Load Video Chunk that starts at ``frame``, named as that node's widgets can set it (``total``:
    the video's frame count, where known)."""
    if total is not None and frame >= total:
        return "nothing more (the video ends there)"
    if not chunk_frames:  # (a start_frame from another node)
        return f"the chunk that starts at frame {frame}"
    if frame % chunk_frames == 0:
        return f"chunk index {frame // chunk_frames} (the chunk that starts at frame {frame})"
    return (f"the chunk that starts at frame {frame}, where no chunk of {chunk_frames} frames starts (chunk_frames "
            "changed since the earlier chunks: set it back)")


def batch_origin(key: str, images: torch.Tensor, state: Any = None) -> tuple:
    """Identity of what decides a run that does not continue the node's stored stream: its settings, its frames
    (shape, dtype and a digest of their bytes, in order) and the ``state`` input it continues, if any (see
    StreamStore.put)."""
    # A digest of every byte: sums would take the same frames reversed, mirrored or with R and B swapped for the
    # same batch, and a cached result could then stand for a run whose stored stream is another. Frame by frame,
    # so that only one frame is ever copied (about 30 ms for a 1080p frame, against seconds to upscale it).
    digest = hashlib.blake2b(digest_size=16)
    for frame in images:
        digest.update(frame.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return (key, tuple(images.shape), str(images.dtype), digest.hexdigest(),
            None if state is None else (state_origin(state) or state_token(state)))


# id -> [the object (weak), its token, the model key and the origin of the run that made it]
_TOKENS: dict[int, list] = {}
_NEXT_TOKEN = itertools.count(1)
_TOKENS_LOCK = threading.Lock()


def state_token(state: Any, model_key: str | None = None, origin: tuple | None = None) -> int:
    """A number naming this state object while it lives (``model_key``, ``origin``: record the settings and the
    origin of the run that made it, for ``state_key`` and ``state_origin``). States are immutable, and one handed
    from node to node is the upstream node's cached output, so the same object means the same state; ``id`` alone
    could name a later object at the same address."""
    with _TOKENS_LOCK:
        for key, (ref, *_) in list(_TOKENS.items()):
            if ref() is None:
                del _TOKENS[key]
        entry = _TOKENS.get(id(state))
        if entry is None:
            entry = _TOKENS[id(state)] = [weakref.ref(state), next(_NEXT_TOKEN), None, None]
        if model_key is not None:
            entry[2], entry[3] = model_key, origin
        return entry[1]


def state_key(state: Any) -> str | None:
    """The model key of the run that made ``state`` (None when not known: not made by an upscale node's run)."""
    with _TOKENS_LOCK:
        entry = _TOKENS.get(id(state))
        return entry[2] if entry is not None and entry[0]() is state else None


def state_origin(state: Any) -> tuple | None:
    """The origin of the run that made ``state`` where its inputs alone decided it (None otherwise: a continuation,
    or not made by an upscale node's run). An upstream node that runs again on the same inputs makes a new state
    object of the same origin, so a node it feeds sees the same inputs and its cached result stays valid."""
    with _TOKENS_LOCK:
        entry = _TOKENS.get(id(state))
        return entry[3] if entry is not None and entry[0]() is state else None
