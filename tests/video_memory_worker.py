"""Run by tests/test_video.py in a fresh process: stream a generated clip through ``upscale_video`` and print the
process's peak RSS in bytes. argv: PACK_DIR FRAMES WORK_DIR [leak]

``leak`` keeps every output frame inside the engine, the failure the memory test must catch.
"""

import importlib.util
import sys
from pathlib import Path

import torch


def main(pack_dir, frames, work, leak=""):
    spec = importlib.util.spec_from_file_location("streamvsr", f"{pack_dir}/__init__.py",
                                                  submodule_search_locations=[pack_dir])
    package = importlib.util.module_from_spec(spec)
    sys.modules["streamvsr"] = package
    spec.loader.exec_module(package)
    sys.path.insert(0, f"{pack_dir}/tests")
    from test_video import FakeEngine, make_clip

    from streamvsr.video.stream import upscale_video

    kept = []

    class Engine(FakeEngine):
        def step(self, frame, state):
            hr, state = super().step(frame, state)
            # FakeEngine records every call for other tests; here nothing per frame may stay alive but a leak.
            self.calls.clear()
            if leak:
                kept.append(hr.clone())
            return hr, state

    work = Path(work)
    clip = make_clip(work / f"in{frames}.mkv", n=int(frames), w=64, h=64, audio="pcm", vcodec="ffv1")
    upscale_video(Engine(), clip, work / f"out{frames}{leak}.mkv", codec="lossless")
    # VmHWM, not ru_maxrss: the latter survives exec, so it would report the forking pytest process's peak
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(peak * 1024)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:])
