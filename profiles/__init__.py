"""Hardware profiles: shipped TOML files in this package, a user's own TOML file, or `auto` (detected).

`load_profile(name_or_path)` returns a validated `HardwareProfile`; `list_profiles()` names the shipped ones.
Detection itself lives in `homerun.plan.hardware`, a layer above.

May import: homerun.errors.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from homerun.errors import ProfileError
from profiles.schema import GIB, CpuSpec, DiskSpec, GpuSpec, HardwareProfile, MemorySpec, PolicySpec, profile_from_dict

PROFILES_DIR = Path(__file__).resolve().parent

__all__ = [
    "GIB", "CpuSpec", "DiskSpec", "GpuSpec", "HardwareProfile", "MemorySpec", "PolicySpec",
    "list_profiles", "load_profile", "load_profile_file", "profile_path",
]


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def profile_path(name: str) -> Path:
    return PROFILES_DIR / f"{name}.toml"


def load_profile_file(path: Path, source: str | None = None) -> HardwareProfile:
    src = source or str(path)
    try:
        data = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{src}: profile file not found", hint="check the path") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{src}: not a UTF-8 text file (byte {exc.start}: {exc.reason})",
                           hint="a profile is a TOML text file saved as UTF-8; see `homerun profiles NAME`") from None
    except IsADirectoryError:
        raise ProfileError(f"{src}: is a directory, not a profile file", hint="pass a .toml file") from None
    except OSError as exc:
        raise ProfileError(f"{src}: cannot read the profile ({exc.strerror})", hint="check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{src}: not valid TOML ({exc})", hint="check the file's syntax") from None
    return profile_from_dict(data, src)


def load_profile(name: str) -> HardwareProfile:
    """A shipped profile by name, or a TOML file by path. (`auto` is handled by homerun.plan.hardware.)"""
    path = Path(name).expanduser()
    if name.endswith(".toml") or path.is_file():
        return load_profile_file(path)
    if profile_path(name).exists():
        return load_profile_file(profile_path(name), f"builtin:{name}.toml")
    raise ProfileError(f"unknown profile '{name}'",
                       hint=f"use auto, a .toml path, or one of: {', '.join(list_profiles())}")
