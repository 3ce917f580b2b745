"""User configuration: `interlace.CONFIG`.

Defaults come from the pydantic models below, then the user's config file
(`$INTERLACE_CONFIG_DIR/config.json`, else `$XDG_CONFIG_HOME/interlace/config.json`, else
`~/.config/interlace/config.json`), then environment variables (`INTERLACE_HOST`,
`INTERLACE_API_KEY`). The file lives in the user's home, never inside the installed package,
so saving a key works in read-only and shared installs.

What Interlace writes (the local job history, a server's database) goes under `data_dir()`,
beside the config directory: `$INTERLACE_DATA_DIR`, else `$XDG_DATA_HOME/interlace`, else
`~/.local/share/interlace`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CONFIG", "Config", "ApiConfig", "AppConfig", "DEFAULT_HOST", "config_dir", "config_path", "data_dir"]

DEFAULT_HOST = "http://127.0.0.1:8000"


class ApiConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True)

    HOST: str = DEFAULT_HOST
    APIKEY: str | None = None
    COMPRESS: bool = True


class AppConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True)

    REMOTE_LOGGING: bool = True
    DEBUG: bool = False
    #: `remote='local'` runs each job in a confined worker process (as a server does), as if
    #: every trace passed `isolate=True`; a trace's own `isolate=` wins.
    ISOLATE_LOCAL: bool = False
    #: Record every `remote=True` and `remote='local'` run in the local job history
    #: (`interlace.jobs`, `interlace jobs list`), under `data_dir()`.
    HISTORY: bool = True
    #: Keep each recorded run's result bytes too (`jobs.diff` then compares saved values);
    #: off by default, since results can be large.
    HISTORY_RESULTS: bool = False


def config_dir() -> Path:
    """Directory of the user config file (created on save only)."""
    explicit = os.environ.get("INTERLACE_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "interlace"


def config_path() -> Path:
    return config_dir() / "config.json"


def data_dir() -> Path:
    """Directory of what Interlace writes for the user (the job history; a server's data):
    `$INTERLACE_DATA_DIR`, else `$XDG_DATA_HOME/interlace`, else `~/.local/share/interlace`.
    Read on each call, so a changed environment variable takes effect at once."""
    explicit = os.environ.get("INTERLACE_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "interlace"


class Config(BaseModel):
    model_config = ConfigDict(validate_assignment=True)

    API: ApiConfig = Field(default_factory=ApiConfig)
    APP: AppConfig = Field(default_factory=AppConfig)

    @classmethod
    def load(cls) -> "Config":
        """Defaults, then the user file, then the environment."""
        data: dict[str, Any] = {}
        path = config_path()
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                # A broken file must not make `import interlace` fail; say where it is.
                import warnings

                warnings.warn(f"Ignoring unreadable Interlace config file {path}: {exc}", stacklevel=2)
                data = {}
        config = cls.model_validate(data) if isinstance(data, dict) else cls()
        config.apply_env()
        return config

    def apply_env(self) -> None:
        host = os.environ.get("INTERLACE_HOST")
        if host:
            self.API.HOST = host
        key = os.environ.get("INTERLACE_API_KEY")
        if key:
            self.API.APIKEY = key

    def save(self) -> Path:
        """Write the current settings to the user config file (atomic replace)."""
        path = config_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=2), encoding="utf-8")
        # The file may hold an API key: keep it private to the user.
        try:
            os.chmod(tmp, 0o600)
        except OSError:
            pass
        os.replace(tmp, path)
        return path

    def set_default_api_key(self, key: str) -> Path:
        """Use `key` from now on and persist it for later sessions; returns the file written."""
        self.API.APIKEY = key
        return _persist(lambda c: setattr(c.API, "APIKEY", key))

    def set_default_host(self, host: str) -> Path:
        """Use `host` from now on and persist it; returns the file written."""
        self.API.HOST = host
        return _persist(lambda c: setattr(c.API, "HOST", host))


def _persist(change: Callable[[Config], None]) -> Path:
    # Persist only what the caller changed: start from the file, not from the live CONFIG, so
    # values that came from the environment (INTERLACE_HOST) are not frozen into the file.
    path = config_path()
    stored: Any = {}
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}
    persisted = Config.model_validate(stored) if isinstance(stored, dict) else Config()
    change(persisted)
    return persisted.save()


CONFIG = Config.load()
