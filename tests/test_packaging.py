"""What users install: requirements.txt must never make pip replace ComfyUI's torch, pyproject agrees with it,
and the ComfyUI registry metadata is complete."""

import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _name(requirement):
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_requirements_leave_torch_alone():
    names = {_name(r) for r in _requirements()}
    assert not names & {"torch", "torchvision", "torchaudio"}, names
    assert not names & {"diffusers", "transformers"}, "reference libraries are test-only"


def test_pyproject_dependencies_are_the_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == sorted(_requirements())
    assert project["scripts"]["streamvsr"] == "streamvsr.cli:main"
    # setuptools warns about the table form ({text = ...}) and stops building it after 2027-02-18
    assert isinstance(project["license"], str)


def test_one_version_everywhere(capsys):
    """The version that pip and the ComfyUI registry read (pyproject) is the one `streamvsr --version` prints, for
    a bug report to name what was run."""
    import pytest

    from streamvsr import __version__
    from streamvsr.cli import main

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == version
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out == f"streamvsr {version}\n"


def test_comfy_registry_metadata():
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert comfy.get(key), key
    icon = comfy["Icon"].split("/main/", 1)[-1]
    assert (ROOT / icon).is_file(), f"the registry icon {icon} is not in the repository"


def test_importing_the_package_has_no_side_effects():
    code = ("import sys, importlib.util; "
            f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(ROOT)!r}]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m); "
            "print(sorted(n for n in ('torch', 'comfy', 'folder_paths', 'av') if n in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert run.stderr == ""


def test_every_code_folder_is_packaged():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    def local(top: str) -> bool:  # (hidden folders: a virtual environment, bench/gpu_side_by_side.sh's wheels)
        return top.startswith(".") or top in ("build", "dist") or (ROOT / top / "pyvenv.cfg").exists()

    on_disk = {"streamvsr"} | {
        "streamvsr." + ".".join(p.parent.relative_to(ROOT).parts) for p in ROOT.rglob("__init__.py")
        if p.parent != ROOT and p.parent.relative_to(ROOT).parts[0] not in ("tests", "bench")
        and not local(p.parent.relative_to(ROOT).parts[0])}
    assert on_disk <= packages, sorted(on_disk - packages)
