"""Config loading: the trainer's dataclass schema + a YAML file + dotted overrides (OmegaConf).

Unknown keys and wrongly typed values are rejected with one line naming the key.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import TrainConfig, resolve

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used (message is one line)."""


def find_config_file(name: str | Path) -> Path:
    """A config path as given, or a preset name from configs/ (``vit_small_imagenet``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (presets in configs/: {presets})")


def load_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- config file <- ``dotted.key=value`` overrides, validated and resolved."""
    merged = OmegaConf.structured(TrainConfig)
    try:
        if config_file is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(find_config_file(config_file)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form dotted.key=value")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"bad config value for {key}: {reason}" if key else reason) from None
    try:
        return resolve(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def config_to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_run(run_dir: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """The resolved config a run was started with (for --resume)."""
    return load_config(Path(run_dir) / "config.yaml", overrides)
