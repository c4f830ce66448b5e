"""Captions tokenised once: token ids cached across runs, in the process and on disk.

Every (method, seed) run builds its datasets again, and with them the token ids of every caption
(about 22 s for COCO's 616k captions with CLIP's tokenizer). The ids depend on two things only,
the tokenizer and the captions, so :class:`TokenCache` keeps them under a key made of both:

* the tokenizer's identity (:func:`tokenizer_identity`): its class, its context length, and
  everything its output depends on (open_clip's BPE tokenizer: the vocabulary, the merges, the
  special tokens, the text cleaning; a Hugging Face tokenizer: its full serialised form), plus
  the open_clip version (the code that applies them). A tokenizer it cannot describe
  exactly gets no cache: its captions are always tokenised;
* the captions: a SHA-256 over the list, in order (each caption length-prefixed, so
  ``["a b", "c"]`` and ``["a", "b c"]`` differ).

Two layers: a process-wide memory layer (the runs of one grid share it; least recently used
entries leave beyond :data:`MEMORY_BUDGET_BYTES`), and, when the cache has a folder, one file
per key under ``<folder>/<key>.pt``, written atomically (:mod:`benchmark.io`) and read with
``torch.load(weights_only=True)``. A file that cannot be read or does not fit its key (wrong
shape or dtype) is ignored and written again. Callers get their own copy of the ids (int64), so
nothing one run does to them reaches another.

The cache in effect is chosen with :func:`using` (a context manager; :mod:`benchmark.scenarios.streams`
sets the run's one while it builds the datasets); outside it, :func:`current` is a memory-only
cache.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..io import atomic_write_with

log = logging.getLogger(__name__)

MEMORY_BUDGET_BYTES = 2 << 30  # COCO's captions at CLIP's 77 positions take 0.38 GiB as int64
FOLDER_NAME = "tokens"  # under the harness's cache folder ($CLVL_CACHE / --cache-dir)


_IDENTITIES: "weakref.WeakKeyDictionary[object, str | None]" = weakref.WeakKeyDictionary()


def tokenizer_identity(tokenizer) -> str | None:
    """A digest of everything the tokenizer's output depends on, or None if unknown.

    Known: open_clip's ``SimpleTokenizer`` (CLIP's BPE) and ``HFTokenizer`` over a fast Hugging
    Face tokenizer. Computed from the tokenizer's tables, not from sample outputs, so two
    tokenizers share an identity only if they tokenise every text alike. Computed once per
    tokenizer object (hashing CLIP's tables takes a fraction of a second; a run builds two
    datasets per task with the same tokenizer)."""
    try:
        return _IDENTITIES[tokenizer]
    except (KeyError, TypeError):  # TypeError: an object weak references cannot follow
        pass
    identity = _describe(tokenizer)
    with contextlib.suppress(TypeError):
        _IDENTITIES[tokenizer] = identity
    return identity


def _describe(tokenizer) -> str | None:
    import open_clip
    from open_clip import tokenizer as oc

    def name(fn) -> str | None:
        return None if fn is None else f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"

    described: dict | None = None
    if isinstance(tokenizer, oc.SimpleTokenizer):
        described = {
            "vocab": sorted(tokenizer.encoder.items(), key=lambda item: item[1]),
            "merges": sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1]),
            "special": tokenizer.all_special_ids, "pattern": tokenizer.pat.pattern,
            "clean": name(tokenizer.clean_fn), "reduction": name(tokenizer.reduction_fn)}
    elif isinstance(tokenizer, oc.HFTokenizer):
        backend = getattr(tokenizer.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow (pure Python) tokenizer: no complete serialised form
            return None
        described = {"tokenizer": backend.to_str(), "clean": name(tokenizer.clean_fn),
                     "strip_sep_token": tokenizer.strip_sep_token, "mode": tokenizer.tokenizer_mode,
                     "language": name(getattr(tokenizer, "set_lang_fn", None))}
    if described is None:
        return None
    described.update({"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
                      "context_length": tokenizer.context_length, "open_clip": open_clip.__version__})
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def captions_digest(captions: Sequence[str]) -> str:
    """SHA-256 over the captions in order, each prefixed with its length in bytes."""
    digest = hashlib.sha256()
    for caption in captions:
        data = caption.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class _Memory:
    """The process-wide layer: key -> int64 ids, least recently used out first."""

    def __init__(self, budget: int):
        self.budget, self.entries, self.size = budget, OrderedDict(), 0

    def get(self, key: str) -> torch.Tensor | None:
        tokens = self.entries.get(key)
        if tokens is not None:
            self.entries.move_to_end(key)
        return tokens

    def put(self, key: str, tokens: torch.Tensor) -> None:
        if key in self.entries:
            self.size -= self.entries.pop(key).nbytes
        self.entries[key] = tokens
        self.size += tokens.nbytes
        while self.size > self.budget and len(self.entries) > 1:
            self.size -= self.entries.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.size = 0


_MEMORY = _Memory(MEMORY_BUDGET_BYTES)


class TokenCache:
    """Token ids by (tokenizer identity, captions); ``folder`` adds the on-disk layer."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.misses = 0  # for logs and tests: lookups answered / tokenised

    def tokens(self, tokenizer, captions: Sequence[str], tokenize: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The ids of ``captions`` (int64 ``[N, context_length]``, a copy), from the cache or from
        ``tokenize()`` (which must tokenise exactly these captions with this tokenizer)."""
        identity = tokenizer_identity(tokenizer)
        if identity is None:
            self.misses += 1
            return tokenize()
        key = hashlib.sha256(f"{identity}\0{captions_digest(captions)}".encode()).hexdigest()[:40]
        tokens = _MEMORY.get(key)
        if tokens is None:
            tokens = self._read(key, len(captions), tokenizer.context_length)
            if tokens is not None:
                _MEMORY.put(key, tokens)
        if tokens is not None:
            self.hits += 1
            return tokens.clone()
        self.misses += 1
        tokens = tokenize().long()
        _MEMORY.put(key, tokens.clone())
        self._write(key, tokens)
        return tokens

    # ---- the disk layer -------------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.pt"

    def _read(self, key: str, count: int, context_length: int) -> torch.Tensor | None:
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged cache file is only a miss
            log.debug("token cache %s unreadable (%s); tokenising again", path, error)
            return None
        if (not isinstance(stored, torch.Tensor) or stored.dtype != torch.int32
                or tuple(stored.shape) != (count, context_length)):
            log.debug("token cache %s does not fit its key; tokenising again", path)
            return None
        return stored.long()

    def _write(self, key: str, tokens: torch.Tensor) -> None:
        path = self._path(key)
        if path is None:
            return
        if tokens.numel() and (int(tokens.max()) > torch.iinfo(torch.int32).max or int(tokens.min()) < 0):
            return  # ids int32 cannot hold: keep them in memory only
        stored = tokens.to(torch.int32)  # half the bytes of int64; CLIP's ids are below 50k
        try:
            atomic_write_with(path, lambda handle: torch.save(stored, handle))
        except OSError as error:  # the cache only saves time; a run never fails for it
            log.warning("could not write the token cache %s (%s); captions will be tokenised again next time",
                        path, error.strerror or error)


_CURRENT: contextvars.ContextVar[TokenCache | None] = contextvars.ContextVar("token_cache", default=None)


def current() -> TokenCache:
    """The cache set by :func:`using`, else a memory-only one."""
    return _CURRENT.get() or TokenCache()


@contextlib.contextmanager
def using(cache: TokenCache | None) -> Iterator[TokenCache]:
    """Make ``cache`` the one :func:`current` returns inside the ``with`` block (None: memory only)."""
    cache = cache or TokenCache()
    token = _CURRENT.set(cache)
    try:
        yield cache
    finally:
        _CURRENT.reset(token)


def clear_memory() -> None:
    """Forget the process-wide layer (tests; a long-lived process that wants its memory back)."""
    _MEMORY.clear()
