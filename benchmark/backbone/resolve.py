"""The one place where a backbone name becomes a model.

Accepted names (``--backbone`` / ``backbone:`` in YAML):

=============================  ==========================================================
``ViT-B-16:openai``            an open_clip architecture and one of its pretrained tags
                               (``python -c "import open_clip; print(open_clip.list_pretrained())"``)
``ViT-B-16:/path/weights.bin`` an architecture and a local weight file (.bin/.pt/.pth/.safetensors)
``local-dir:/path/to/model``   a folder in open_clip's hub layout (``open_clip_config.json`` + weights)
``hf-hub:org/name``            an open_clip model on the Hugging Face hub (or in its local cache)
``clvl-tiny``                  an architecture with random weights (tests, debugging)
``clvl-tiny:synthetic``        weights the harness makes itself (see :func:`register_weight_recipe`)
=============================  ==========================================================

Architectures are open_clip's own plus the configs shipped in ``benchmark/backbone/configs``.
Downloads go to ``<cache_dir>/open_clip`` (``$CLVL_CACHE``). Weights already there are loaded
without touching the network. Weights that are not there are downloaded only if the hub (or
the tag's URL) answers within :data:`PROBE_TIMEOUT_S`; with ``HF_HUB_OFFLINE=1`` or no network
the load fails at once, in one line, instead of retrying for a minute.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BenchmarkError, DataError, RegistryError
from ..registry import BrokenEntry, Registry, did_you_mean
from .adapter import ClipBackbone

log = logging.getLogger(__name__)

# Package data of ``benchmark.backbone`` (pyproject's [tool.setuptools.package-data]). open_clip
# reads configs from a folder, so this must be a real directory: true for any unpacked install.
CONFIG_DIR = Path(os.fspath(resources.files(__package__).joinpath("configs")))
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
RANDOM_TAGS = ("", "none", "random")
PROBE_TIMEOUT_S = 2.0  # how long the hub (or a weight URL) may take to accept a connection
HUB_ENDPOINT = "https://huggingface.co"  # huggingface_hub's default; $HF_ENDPOINT replaces it

_configs_registered = False


def _check_recipe(make_weights, origin: str) -> None:
    if not callable(make_weights):
        raise BrokenEntry(f"{origin} is not a function (arch, cache_dir) -> weight file")


# tag -> function(arch, cache_dir) returning a weight file the harness made (and cached). The
# synthetic scenario's recipe is imported only when its tag is used.
_WEIGHT_RECIPES = Registry("weight recipe", check=_check_recipe)
_WEIGHT_RECIPES.add_lazy("synthetic", "benchmark.scenarios.synthetic:pretrained_synthetic_weights")
# tag -> the scenario whose data the recipe pretrains on (known without importing the recipe).
_RECIPE_SCENARIOS: dict[str, str] = {"synthetic": "synthetic"}


def register_weight_recipe(tag: str, make_weights: Callable[[str, Path], Path], *,
                           scenario: str | None = None) -> None:
    """Let ``ARCH:tag`` name weights that the harness produces itself (e.g. by pretraining).

    ``make_weights(arch, cache_dir)`` must return the path of an open_clip state-dict file,
    creating it on first use and reusing it afterwards. ``scenario`` is the scenario whose data
    the weights are pretrained on, if any: a run of another scenario with them is warned about
    when it is planned (:func:`warn_if_pretrained_elsewhere`). A later recipe for the same tag
    replaces the earlier one.
    """
    _WEIGHT_RECIPES[tag] = make_weights  # item assignment: a registry (or a test's plain dict) replaces
    if scenario is None:
        _RECIPE_SCENARIOS.pop(tag, None)
    else:
        _RECIPE_SCENARIOS[tag] = scenario


def pretrained_for(name: str) -> str | None:
    """The scenario a harness-made backbone ``name`` (``ARCH:tag`` of a weight recipe) was
    pretrained on; None for every other backbone, or a recipe that declares none."""
    _, tag = parse_backbone_name(name)
    return _RECIPE_SCENARIOS.get(tag) if tag else None


def warn_if_pretrained_elsewhere(name: str, scenario: str) -> str | None:
    """Log a warning (and return it) when backbone ``name`` was pretrained by the harness on a
    scenario other than ``scenario``: its features fit that scenario's data only, and on other
    data recall comes out near chance."""
    source = pretrained_for(name)
    if source is None or source == scenario:
        return None
    message = (f"backbone {name} was pretrained by the harness on the {source!r} scenario's data only; on "
               f"{scenario!r} expect recall near chance: give a real backbone, e.g. --backbone ViT-B-16:openai")
    log.warning(message)
    return message


def _register_shipped_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        import open_clip

        if not any(CONFIG_DIR.glob("*.json")):
            raise BenchmarkError(f"the backbone configs shipped with the harness are missing from {CONFIG_DIR} "
                                 "(a broken install: reinstall clvl-benchmark)")
        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def list_architectures() -> list[str]:
    import open_clip

    _register_shipped_configs()
    return sorted(open_clip.list_models())


def parse_backbone_name(name: str) -> tuple[str, str | None]:
    """Split ``"ARCH:TAG"`` into ``(ARCH, TAG)``; hub/local-dir schemas are kept whole."""
    name = name.strip()
    if not name:
        raise RegistryError("empty backbone name; use e.g. 'ViT-B-16:openai' or 'clvl-tiny'")
    if name.startswith(("local-dir:", "hf-hub:")):
        return name, None
    arch, _, tag = name.partition(":")
    return arch, tag


def load_backbone(name: str, *, cache_dir: Path | None = None, device: str = "cpu") -> ClipBackbone:
    """Resolve ``name`` (see the module docstring) into a :class:`ClipBackbone` on ``device``."""
    import open_clip

    _register_shipped_configs()
    arch, tag = parse_backbone_name(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pretrained: str | None

    if tag is None:  # local-dir: / hf-hub:
        if arch.startswith("local-dir:"):
            folder = Path(arch.split(":", 1)[1]).expanduser()
            if not (folder / "open_clip_config.json").is_file():
                raise DataError(f"backbone folder {folder} has no open_clip_config.json; "
                                "a local-dir: backbone needs open_clip's hub layout (config + weights)")
        pretrained = None
    else:
        if arch not in open_clip.list_models():
            hint = did_you_mean(arch, open_clip.list_models(), n=5)
            raise RegistryError(f"unknown backbone architecture {arch!r}{hint}; "
                                "`python -c \"import open_clip; print(open_clip.list_models())\"` lists them")
        pretrained = _resolve_tag(arch, tag, cache_dir)

    download_dir = cache_dir / "open_clip"
    cached = _weights_at_hand(name, arch, pretrained, download_dir)
    try:
        with _hub_offline(cached is True):  # cached weights: no network call at all, so no retries either
            model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device, cache_dir=str(download_dir))
            tokenizer = open_clip.get_tokenizer(arch, cache_dir=str(download_dir))
    except Exception as error:
        # A weight file (given, or a recipe's) that does not load: open_clip raises RuntimeError,
        # AssertionError, KeyError, ... for a state dict that does not fit, unpickling errors for a
        # file that is not one. Running out of memory is not the file's fault: that propagates.
        import torch

        if (pretrained is not None and os.path.isfile(pretrained)
                and not isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError))):
            raise weight_file_error(arch, Path(pretrained), error) from None
        if not isinstance(error, RuntimeError):
            raise
        if "Failed to download" in str(error) or "offline" in str(error).lower():
            raise BenchmarkError(
                f"could not get the weights of {name} (no network or not cached): download them and pass the "
                f"file, e.g. --backbone {arch}:/path/to/open_clip_pytorch_model.bin") from None
        raise
    log.info("backbone %s: %.1f M parameters", name, sum(p.numel() for p in model.parameters()) / 1e6)
    return ClipBackbone(model, preprocess_train, preprocess_eval, tokenizer, spec=name).to(device)


def _resolve_tag(arch: str, tag: str, cache_dir: Path) -> str | None:
    import open_clip

    if tag.lower() in RANDOM_TAGS:
        log.warning("backbone %s has random weights (no pretrained tag given)", arch)
        return None
    if tag in _WEIGHT_RECIPES:
        return str(_WEIGHT_RECIPES[tag](arch, cache_dir))
    looks_like_path = os.sep in tag or tag.endswith(WEIGHT_SUFFIXES)
    if looks_like_path:
        path = Path(tag).expanduser()
        if not path.is_file():
            raise DataError(f"backbone weight file {path} does not exist; give the path of an open_clip checkpoint")
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        known = ", ".join(tags + sorted(_WEIGHT_RECIPES)) or "none"
        raise RegistryError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {known}; "
                            "or give a weight file path")
    return tag


# ============================================================================ weight files

# What a CLIP's tensor shapes say about its architecture, in the order a message lists them.
SHAPE_FEATURES = ("patch size", "image size", "vision width", "vision layers", "vision MLP width",
                  "text width", "text layers", "text MLP width", "context length", "embed dim")


def weight_file_error(arch: str, path: Path, error: Exception) -> DataError:
    """A one-line error for a weight file that open_clip could not load into ``arch``: which of
    its shapes do not fit ``arch``, and which known architectures it does fit, if any."""
    import open_clip
    from open_clip.factory import load_state_dict

    try:
        found = state_shapes(load_state_dict(str(path), device="cpu"))
    except Exception as read_error:  # not a state dict at all
        return DataError(f"weight file {path} cannot be read as an open_clip state dict ({type(read_error).__name__}: "
                         f"{str(read_error).splitlines()[0] if str(read_error) else 'no details'}); give a .bin/.pt/"
                         ".pth (torch.save of the model's state_dict) or .safetensors file")
    expected = config_shapes(open_clip.get_model_config(arch)) or {}
    differ = [f"{key} {found[key]} (not {expected[key]})" for key in SHAPE_FEATURES
              if key in found and key in expected and found[key] != expected[key]]
    if not differ:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return DataError(f"weight file {path} does not load into architecture {arch} ({first}); "
                         "give a file saved from that architecture")
    fits = [model for model in open_clip.list_models()
            if (shapes := config_shapes(open_clip.get_model_config(model))) is not None
            and all(shapes.get(key) == value for key, value in found.items())]
    if fits:
        shown = ", ".join(fits[:4]) + (f" and {len(fits) - 4} more" if len(fits) > 4 else "")
        advice = f"its shapes are those of {shown}: e.g. --backbone {fits[0]}:{path}"
    else:
        advice = "no known architecture has its shapes; give the architecture it was saved from"
    return DataError(f"weight file {path} does not fit architecture {arch}: it has "
                     f"{', '.join(differ)}; {advice}")


def state_shapes(state: dict) -> dict[str, int]:
    """:data:`SHAPE_FEATURES` read off an open_clip CLIP state dict (those it has)."""
    found: dict[str, int] = {}
    conv = state.get("visual.conv1.weight")  # [width, 3, patch, patch]
    if conv is not None and conv.ndim == 4:
        found["vision width"], found["patch size"] = int(conv.shape[0]), int(conv.shape[-1])
        positions = state.get("visual.positional_embedding")  # [1 + grid * grid, width]
        if positions is not None and positions.ndim == 2:
            found["image size"] = math.isqrt(int(positions.shape[0]) - 1) * found["patch size"]
    for tower, prefix in (("vision", "visual.transformer.resblocks."), ("text", "transformer.resblocks.")):
        blocks = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
        if blocks:
            found[f"{tower} layers"] = len(blocks)
        mlp = state.get(f"{prefix}0.mlp.c_fc.weight")  # [mlp width, width]
        if mlp is not None and mlp.ndim == 2:
            found[f"{tower} MLP width"] = int(mlp.shape[0])
    text_positions = state.get("positional_embedding")  # [context, text width]
    if text_positions is not None and text_positions.ndim == 2:
        found["context length"], found["text width"] = (int(n) for n in text_positions.shape)
    projection = state.get("visual.proj")  # [vision width, embed dim]
    if projection is not None and projection.ndim == 2:
        found["embed dim"] = int(projection.shape[1])
    return found


def config_shapes(config: dict | None) -> dict[str, int] | None:
    """:data:`SHAPE_FEATURES` of an open_clip model config; None for towers other than open_clip's
    own ViT and text transformer (timm or Hugging Face towers, ResNets)."""
    if not config:
        return None
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if ("timm_model_name" in vision or "hf_model_name" in text or not isinstance(vision.get("layers", 12), int)):
        return None
    image_size = vision.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            return None
        image_size = image_size[0]
    width, text_width = vision.get("width", 768), text.get("width", 512)
    return {"patch size": vision.get("patch_size", 16), "image size": image_size, "vision width": width,
            "vision layers": vision.get("layers", 12), "vision MLP width": int(width * vision.get("mlp_ratio", 4.0)),
            "text width": text_width, "text layers": text.get("layers", 12),
            "text MLP width": int(text_width * text.get("mlp_ratio", 4.0)),
            "context length": text.get("context_length", 77), "embed dim": config.get("embed_dim")}


# ============================================================================ downloads


def _weights_at_hand(name: str, arch: str, pretrained: str | None, download_dir: Path) -> bool | None:
    """Whether open_clip will find ``name``'s weights in ``download_dir`` (True) or must download
    them (False, after checking that it can; a :class:`DataError` at once when it cannot); None
    when there is nothing to download (random weights, a local file or folder)."""
    import open_clip

    if arch.startswith("hf-hub:"):
        model_id = arch.split(":", 1)[1]
        files = [(model_id, "open_clip_config.json"), (model_id, None)]
        url = os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
    elif pretrained is None or arch.startswith("local-dir:") or os.path.isfile(pretrained):
        return None  # random weights, a folder or a file: nothing to download
    else:
        cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
        if "file" in cfg or not cfg:
            return None
        if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():  # open_clip prefers the hub
            model_id, filename = os.path.split(cfg["hf_hub"])
            files = [(model_id, filename or None)]
            url = os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT
        else:
            url = cfg.get("url", "")
            if (download_dir / os.path.basename(url)).is_file():
                return True
            files = []
    if files and all(_in_hub_cache(model_id, filename, download_dir) for model_id, filename in files):
        return True
    if _offline_requested():
        reason = "HF_HUB_OFFLINE is set"
    elif not _reachable(url):
        reason = f"{urllib.parse.urlsplit(url).hostname} cannot be reached within {PROBE_TIMEOUT_S:g} s"
    else:
        return False  # open_clip downloads them
    local = ("a local copy in open_clip's hub layout: --backbone local-dir:/path/to/folder" if arch.startswith("hf-hub:")
             else f"a weight file: --backbone {arch}:/path/to/open_clip_pytorch_model.bin")
    raise DataError(f"the weights of {name} are not in the cache ({download_dir}) and cannot be downloaded "
                    f"({reason}): run once with network access to cache them ($CLVL_CACHE or --cache-dir says "
                    f"where), or pass {local}")


def _in_hub_cache(model_id: str, filename: str | None, download_dir: Path) -> bool:
    """Whether ``filename`` of hub repo ``model_id`` is in the cache (``None``: open_clip's
    default weight file, or its safetensors twin, the one open_clip tries first)."""
    from huggingface_hub import try_to_load_from_cache

    if filename is None:
        candidates = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    else:
        candidates = [filename]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
    return any(isinstance(try_to_load_from_cache(model_id, candidate, cache_dir=str(download_dir)), str)
               for candidate in candidates)


def _offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value, now or when
    huggingface_hub was imported."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url``'s host (or the proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``
    names for it) accepts a TCP connection within ``timeout`` seconds, name lookup included: it
    runs in a thread that is abandoned if it takes longer."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if not parts.hostname:
            return False
    port = parts.port or (80 if parts.scheme == "http" else 443)
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, name="clvl-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """huggingface_hub in offline mode while open_clip loads cached weights (it reads the flag
    at each request), so that a cached model never waits on the network."""
    if not enabled:
        yield
        return
    import huggingface_hub.constants

    previous = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = previous


def default_cache_dir() -> Path:
    """``$CLVL_CACHE``, else ``~/.cache/clvl-benchmark``: pretrained tiny models, downloads."""
    return Path(os.environ.get("CLVL_CACHE", Path.home() / ".cache" / "clvl-benchmark")).expanduser()
