"""Config loading: the trainer's dataclass schema + a YAML file + dotted overrides (OmegaConf).

Unknown keys and wrongly typed values are rejected with one line naming the key. A config
read from a run directory (`config_from_run`) may come from someone else: it is parsed as
plain YAML (no Python tags) and its ``${...}`` interpolations stay text, so no resolver
(``${oc.env:VAR}``) runs on it.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stabilitylab.rundir import CONFIG_FILE, is_run_dir, read_yaml_mapping
from trainer.config import TrainConfig, resolve

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used (message is one line)."""

    user_error = True  # the CLI prints it as one line and exits 2


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


def read_yaml_config(path: Path, *, interpolate: bool = True) -> dict:
    """A YAML config file as a plain dict: safe YAML only, one-line errors naming the file.

    ``interpolate=False`` escapes every ``${`` so that OmegaConf keeps it as text.
    """
    try:
        data = read_yaml_mapping(path)
    except ValueError as exc:
        raise ConfigError(f"{path} {exc}") from None
    return data if interpolate else _escape_interpolations(data)


def _escape_interpolations(node):
    if isinstance(node, dict):
        return {key: _escape_interpolations(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_escape_interpolations(value) for value in node]
    if isinstance(node, str):
        return node.replace("${", "\\${")
    return node


def load_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults <- config file <- ``dotted.key=value`` overrides, validated and resolved.

    The config.yaml of a run directory (``--config RUN_DIR/config.yaml``, ``--resume``)
    keeps its ``${...}`` as text; interpolations in other config files are resolved.
    """
    merged = OmegaConf.structured(TrainConfig)
    try:
        if config_file is not None:
            path = find_config_file(config_file)
            data = read_yaml_config(path, interpolate=not is_run_dir(path.parent))
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
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
    """The config as YAML text (a ``${...}`` kept as text stays text in the file)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_run(run_dir: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """The config a run directory's config.yaml describes (for --resume), with no resolvers."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: a run directory written by `stabilitylab train` has one")
    return load_config(path, overrides)
