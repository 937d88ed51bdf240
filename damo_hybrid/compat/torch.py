"""The seed's torch package (``damo_embedding`` 1.2), on damo_hybrid's store.

A script that says ``from damo_embedding import Embedding, damo_embedding_init, save_model,
load_model`` runs with ``from damo_hybrid.compat.torch import ...``::

    model = DeepFM(...)                        # holds Embedding(dim, group, initializer=..., optimizer=...)
    damo_embedding_init(model, "workdir", 86400)
    loss = criterion(model(ids), y); loss.backward(); dense_opt.step()   # rows step in backward
    save_model(model, "out")                   # out/save_model/: model.pt, the rows, sparse_config.json
    model = load_model("out")                  # dense weights and rows back (rows in a temporary workdir)

:class:`Embedding` maps int64 ids (B, F) to float32 (B, F, dim): the batch's ids are
de-duplicated once (``torch.unique``), their rows pulled in one call, and in backward each unique
id's summed gradient is pushed once, as in the seed. Id 0 is padding: zeros, never stepped.

Process-wide state: the seed keeps one ``damo.Damo`` for the process and refuses a second. Here
:func:`damo_embedding_init` binds the model's embeddings to the :class:`~damo_hybrid.compat.damo.Damo`
of its ``workdir``; :data:`REGISTRY` keeps one open ``Damo`` per workdir (so a second init over the
same workdir reuses it, and two models over two workdirs train side by side), and
``REGISTRY.reset()`` closes them all.

Gradient scale: the seed divides each sparse gradient by the batch size in backward, on top of the
mean the loss already took. That is not copied here: the rows get the true gradient of the loss,
as torch's own embeddings do. For AdamW (the seed's only 1.2 optimizer) the update barely changes,
since Adam is invariant to a constant gradient scale up to ``epsilon``.

Saves are crash-safe: ``save_model`` builds ``save_model/`` (and ``inference/``) in a hidden
sibling, writes a ``MANIFEST.json`` of every file's size and SHA-256 last, and swaps it in whole
(:func:`~damo_hybrid.storage.files.atomic_dir`); ``load_model`` checks the manifest and refuses a
save whose files are not those of one ``save_model`` call (or that lacks its rows) with one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import clip
from ..errors import DamoHybridError
from ..storage.files import DamagedOutputError, atomic_dir, read_whole, remove_leftovers, verify_manifest
from .damo import Damo

__all__ = ["Embedding", "damo_embedding_init", "save_model", "load_model", "REGISTRY"]

_SAVE_DIR = "save_model"
_SAVE_MARKERS = ("model.pt", "sparse_config.json")  # an existing save_model/ holding one is a save
_SAVE_FIX = "save it again with save_model()"
_WORKDIR = "damo_workdir-{pid}-"  # load_model's temporary workdirs; a dead process's are removed


class _Registry:
    """The open :class:`Damo` of each workdir (the one piece of process-wide state)."""

    def __init__(self) -> None:
        self._open: dict[Path, Damo] = {}

    def open(self, config: dict[str, Any]) -> Damo:
        key = Path(config["dir"]).resolve()
        d = self._open.get(key)
        if d is None or d.store.closed:
            d = self._open[key] = Damo(config)
        return d

    def reset(self) -> None:
        """Close every open Damo (their rows reach disk)."""
        for d in self._open.values():
            d.close()
        self._open.clear()


REGISTRY = _Registry()


class _Lookup(torch.autograd.Function):
    """Rows of the unique ids forward; their summed gradients pushed to the Damo in backward."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, inverse: torch.Tensor, emb: Embedding, keys: np.ndarray) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.emb, ctx.keys, ctx.n = emb, keys, rows.shape[0]
        return rows.index_select(0, inverse.reshape(-1)).view(*inverse.shape, rows.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None, None]:
        (inverse,) = ctx.saved_tensors
        g = grad.new_zeros(ctx.n, grad.shape[-1]).index_add_(0, inverse.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        ctx.emb._push(ctx.keys, g.detach().to("cpu", torch.float32).numpy())
        return None, None, None, None


class Embedding(torch.nn.Module):
    """The seed's ``damo_embedding.Embedding``: rows of one group, looked up by int64 ids.

    Args:
        dim: embedding width.
        group: the group (its table), in [0, 256).
        initializer: the seed's initializer dict (``{"name": "uniform"}`` ...).
        optimizer: the seed's optimizer dict (``{"name": "adamw", "gamma": ...}``).
        kwargs: accepted and ignored, as the seed does.
    """

    def __init__(self, dim: int, group: int, initializer: dict | None = None, optimizer: dict | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {clip(dim)}")
        if not isinstance(group, int) or isinstance(group, bool) or not 0 <= group < 256:
            raise ValueError(f"group must be an int in [0, 256), got {clip(group)}")
        self.dim, self.group = dim, group
        self.initializer = dict(initializer or {})
        self.optimizer = dict(optimizer or {})
        self.damo: Damo | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickles (torch.save, deepcopy) without the open store
        state = dict(self.__dict__)
        state["damo"] = None
        return state

    def _bound(self) -> Damo:
        if self.damo is None or self.damo.store.closed:
            raise DamoHybridError("this Embedding is not bound to a store: call damo_embedding_init(model, workdir, ttl) "
                                  "(or load_model) first")
        return self.damo

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """float32 (B, F, dim) rows of int64 ids (B, F); id 0 reads as zeros."""
        if not isinstance(input, torch.Tensor) or input.dim() != 2:
            raise ValueError(f"input must be a 2-D tensor of ids (batch, fields), got "
                             f"{input.dim() if isinstance(input, torch.Tensor) else type(input).__name__}-D")
        if input.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input must hold int64 ids, got {input.dtype}")
        d = self._bound()
        ids = input.detach().to("cpu", torch.int64)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        keys = uniq.numpy()
        w = np.empty((len(keys), self.dim), np.float32)
        d.pull(self.group, keys, w)
        rows = torch.from_numpy(w).to(input.device)
        inverse = inverse.to(input.device)
        if not (self.training and torch.is_grad_enabled()):
            return rows.index_select(0, inverse.reshape(-1)).view(*inverse.shape, self.dim)
        rows.requires_grad_(True)
        return _Lookup.apply(rows, inverse, self, keys)

    def _push(self, keys: np.ndarray, grads: np.ndarray) -> None:
        self._bound().push(self.group, keys, grads)


def _embeddings(model: torch.nn.Module) -> list[Embedding]:
    found = [m for m in model.modules() if isinstance(m, Embedding)]
    groups = [e.group for e in found]
    dup = sorted({g for g in groups if groups.count(g) > 1})
    if dup:
        raise ValueError(f"groups {dup} are used by more than one Embedding; every Embedding needs its own group")
    return found


def _config(embs: list[Embedding], workdir: str | os.PathLike[str], ttl: int) -> dict[str, Any]:
    # the ttl as given (a numpy int as an int): Damo refuses one that is not an int, never truncates it
    return {"dir": str(Path(workdir).resolve()), "ttl": ttl.item() if isinstance(ttl, np.generic) else ttl,
            "embeddings": [{"dim": e.dim, "group": e.group, "initializer": e.initializer, "optimizer": e.optimizer}
                           for e in embs]}


def damo_embedding_init(model: torch.nn.Module | None, workdir: str | os.PathLike[str], ttl: int = 0,
                        **kwargs: Any) -> Damo:
    """Open the store at ``workdir`` for the model's :class:`Embedding` groups and bind them to it.

    Args:
        model: the model; None with ``model_dir=...`` loads a saved one (as the seed).
        workdir: the store directory.
        ttl: seconds after which unwritten rows expire (0: never).
    Returns:
        The :class:`Damo` the embeddings are bound to.
    """
    unknown = set(kwargs) - {"model_dir"}
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}")
    if model is None:
        if not kwargs.get("model_dir"):
            raise ValueError("give a model, or model_dir=... of a saved one")
        model = load_model(kwargs["model_dir"], workdir=workdir, ttl=ttl)
        return _embeddings(model)[0]._bound() if _embeddings(model) else REGISTRY.open(_config([], workdir, ttl))
    embs = _embeddings(model)
    d = REGISTRY.open(_config(embs, workdir, ttl))
    for e in embs:
        if e.group not in d.dims:
            raise ValueError(f"the store at {workdir} is open without group {e.group}; call REGISTRY.reset() first "
                             "to reopen it with this model's groups")
        e.damo = d
    return d


def save_model(model: torch.nn.Module, output_dir: str | os.PathLike[str], training: bool = True, **kwargs: Any) -> None:
    """Save a model as the seed does, into ``output_dir/save_model/``, replaced whole: built in a
    hidden sibling and swapped in when complete, so an interrupted save leaves the previous one.

    ``training=True`` writes ``model.pt`` (the whole module, embeddings unbound), ``state.pth``
    (its state dict), ``sparse_config.json`` (the store's ttl and each embedding's dim, group,
    initializer and optimizer), ``checkpoint`` (every row with its optimizer state) and, last,
    ``MANIFEST.json`` (each file's size and SHA-256). ``training=False`` is the inference export
    (ONNX, ``output_dir/inference/``; see :func:`_save_inference`).

    Raises:
        ValueError: ``output_dir/save_model`` holds something else than a save (nothing is written).
    """
    if not training:
        _save_inference(model, Path(output_dir), **kwargs)
        return
    if kwargs:
        raise TypeError(f"unknown arguments {sorted(kwargs)}")
    embs = _embeddings(model)
    damos = {id(e._bound()): e.damo for e in embs}
    if len(damos) > 1:
        raise ValueError("the model's embeddings are bound to more than one store; bind them with one damo_embedding_init")
    with atomic_dir(Path(output_dir) / _SAVE_DIR, markers=_SAVE_MARKERS, what="saved model") as work:
        for d in damos.values():
            assert d is not None
            d.checkpoint(work / "checkpoint")
        torch.save(model, work / "model.pt")
        torch.save(model.state_dict(), work / "state.pth")
        ttl = next(iter(damos.values())).ttl if damos else 0  # type: ignore[union-attr]
        cfg = _config(embs, ".", ttl)
        del cfg["dir"]
        (work / "sparse_config.json").write_text(json.dumps(cfg, indent=2))


def load_model(model_dir: str | os.PathLike[str], workdir: str | os.PathLike[str] | None = None,
               ttl: int | None = None) -> torch.nn.Module:
    """A model saved by :func:`save_model`, its embeddings bound to a store holding the saved rows.

    Args:
        model_dir: the ``output_dir`` given to :func:`save_model`.
        workdir: where the restored rows live (a new directory); training may go on from there.
            Default: a temporary one in the temporary folder (``tempfile.gettempdir()``:
            ``TMPDIR``, else ``/tmp``), ``damo_workdir-<pid>-...``, deleted when its store closes
            (``REGISTRY.reset()``) or the process exits; give one to keep the rows. The model
            folder is only read (it may be on read-only media).
        ttl: as :func:`damo_embedding_init`; default: the saved store's.
    Raises:
        FileNotFoundError: ``model_dir`` holds no saved model.
        DamagedOutputError: the save's files are not those of one :func:`save_model` call (one
            missing, such as the rows file, cut short, or from another save); nothing is opened.
    """
    root = Path(model_dir)
    opened: list[Damo] = []

    def load(src: Path) -> torch.nn.Module:
        if not (src / "model.pt").is_file():
            raise FileNotFoundError(f"no saved model in {model_dir} (expected {src / 'model.pt'})")
        cfg = _saved_config(src)
        need = ["model.pt", "state.pth", "sparse_config.json", *(["checkpoint"] if cfg.get("embeddings") else [])]
        verify_manifest(src, "saved model", required=need, fix=_SAVE_FIX)  # None (a warning): an older save
        missing = [n for n in need if not (src / n).is_file()]
        if missing:  # an older save without a manifest: its rows file, at least, must be there
            why = f" (its {len(cfg['embeddings'])} embedding groups need their rows)" if missing[0] == "checkpoint" else ""
            raise DamagedOutputError(f"{src / missing[0]} is missing: the saved model is incomplete{why}; {_SAVE_FIX}")
        model = torch.load(src / "model.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(torch.load(src / "state.pth", map_location="cpu", weights_only=True))
        d = damo_embedding_init(model, workdir if workdir is not None else _temporary_workdir(opened),
                                cfg.get("ttl", 0) if ttl is None else ttl)
        if workdir is None and d not in opened:
            d._delete_when_closed()
            opened.append(d)
        if (src / "checkpoint").is_file():
            d.load(src / "checkpoint")
        return model

    try:
        return read_whole(root / _SAVE_DIR, load, "saved model")
    except BaseException:
        for d in opened:  # a temporary workdir is not left behind by a failed load
            d.close()
        raise


def _saved_config(src: Path) -> dict[str, Any]:
    p = src / "sparse_config.json"
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise DamagedOutputError(f"{p} is missing: the saved model is incomplete; {_SAVE_FIX}") from None
    except (OSError, ValueError) as e:
        raise DamagedOutputError(f"{p} is unreadable ({str(e)[:80]}); {_SAVE_FIX}") from None
    if not isinstance(cfg, dict):
        raise DamagedOutputError(f"{p} is not a JSON object; {_SAVE_FIX}")

    def whole(v: Any, lo: int, hi: int | None = None) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v < hi)

    def damaged(what: str, v: Any, want: str) -> DamagedOutputError:
        return DamagedOutputError(f"{p} gives {what} {clip(v)}, not {want}: the saved model is damaged; {_SAVE_FIX}")

    if not whole(cfg.get("ttl", 0), 0):
        raise damaged("ttl", cfg["ttl"], "an int >= 0")
    embs = cfg.get("embeddings", [])
    if not isinstance(embs, list) or not all(isinstance(e, dict) for e in embs):
        raise damaged("embeddings", embs, "a list of objects")
    for i, e in enumerate(embs):
        if not whole(e.get("dim"), 1):
            raise damaged(f"embeddings[{i}].dim", e.get("dim"), "an int >= 1")
        if not whole(e.get("group"), 0, 256):
            raise damaged(f"embeddings[{i}].group", e.get("group"), "an int in [0, 256)")
        for part in ("initializer", "optimizer"):
            if not isinstance(e.get(part) or {}, dict):
                raise damaged(f"embeddings[{i}].{part}", e[part], "an object")
    return cfg


def _temporary_workdir(opened: list[Damo]) -> str:
    """A new workdir name in the temporary folder for :func:`load_model` (the one it opened
    already, on a second read), never in the model's folder, which a reader must not write (it may
    be read-only); those of processes that are gone are removed first."""
    if opened:
        return str(opened[0].dir)
    tmp = tempfile.gettempdir()
    remove_leftovers(Path(tmp), r"damo_workdir-(\d+)-\w+")
    wd = tempfile.mkdtemp(prefix=_WORKDIR.format(pid=os.getpid()), dir=tmp)
    os.rmdir(wd)  # the store creates it
    return wd


def _save_inference(model: torch.nn.Module, output_dir: Path, dummy_input: torch.Tensor | None = None,
                    input_names: list[str] | None = None, output_names: list[str] | None = None,
                    dynamic_axes: dict | None = None, opset_version: int = 17) -> None:
    """The seed's inference export: ``output_dir/inference/model.onnx``, the model with each
    :class:`Embedding` replaced by a plain ``nn.Embedding`` over its group's stored rows (row 0
    zeros, the row of an unknown key), and ``output_dir/inference/mapper.json``,
    ``{group: {key: row}}``. Only ``dummy_input``'s shape and dtype are used: the graph is traced
    on row 0, since the seed's examples pass raw ids that are not rows. The folder is replaced
    whole, with a ``MANIFEST.json`` (:func:`~damo_hybrid.storage.files.atomic_dir`)."""
    from ..serving.onnx import onnx_export

    if dummy_input is None:
        raise ValueError("save_model(training=False) needs dummy_input: an int64 tensor shaped like the model's input")
    embs = _embeddings(model)
    copy = __import__("copy").deepcopy(model)  # the embeddings unbound (see Embedding.__getstate__)
    mapper: dict[str, dict[str, int]] = {}
    for name, mod in list(copy.named_modules()):
        if not isinstance(mod, Embedding):
            continue
        src = next(e for e in embs if e.group == mod.group)
        store = src._bound().store
        keys, weights = [np.zeros(0, np.uint64)], [np.zeros((0, mod.dim), np.float32)]
        for k, rows in store.scan(f"group_{mod.group}"):
            keys.append(k)
            weights.append(rows.weights)
        k = np.concatenate(keys).view(np.int64)  # the seed's ids are int64
        w = np.concatenate([np.zeros((1, mod.dim), np.float32), *weights])
        mapper[str(mod.group)] = dict(zip(map(str, k.tolist()), range(1, len(k) + 1)))
        table = torch.nn.Embedding.from_pretrained(torch.from_numpy(w), freeze=True, padding_idx=0)
        parent, _, attr = name.rpartition(".")
        setattr(copy.get_submodule(parent) if parent else copy, attr, table)
    copy.eval()
    with atomic_dir(output_dir / "inference", markers=("mapper.json", "model.onnx"), what="inference export") as out:
        with torch.no_grad():
            onnx_export(copy, (torch.zeros_like(dummy_input),), out / "model.onnx", input_names=input_names,
                        output_names=output_names, dynamic_axes=dynamic_axes, opset_version=opset_version)
        (out / "mapper.json").write_text(json.dumps(mapper))
