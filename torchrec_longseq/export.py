"""A trained model as a serving artefact: exported with ``torch.export``, compiled with AOTInductor,
loaded in a fresh process without the model-building code (``serving.export`` / ``serving.load``).

What is exported is ``serving.score_shared``, the shared-history scoring of one request (each
history searched once for all candidates), as the module ``RequestScorer``: its inputs are the
request's features as one dict of 1-D int64 tensors (the model's keys), the request time (a 0-d
int64 tensor) and the dense history timestamps. Dynamic: every sequence's history length L
(0 and up, one dimension per sequence) and the number of candidates C (1 and up; a request of 0
candidates is answered without the graph). Per-user features keep the number of ids of the
example request (``RequestError`` otherwise).

The artefact is a directory::

    model.pt2     the AOTInductor package: the compiled graph and, as its constants, the tables
                  it reads and the derived tables (ETA's signatures, SDIM's codes, TWIN's
                  projections), as they were at export
    ids/          (a model trained on a prepared store) the store's id mappings, ``meta.json``
                  and ``vocab/``: ``IdMapping.load(path / "ids", column)`` maps raw ids to rows
    serving.json  the request layout (every key, its group, its fixed size for per-user
                  features), the schemas and the table sizes (``serving.ServingSpec``, so
                  requests are checked as ``score_request`` checks them), the ``longseq``
                  operators the graph calls, and the torch version it was compiled with

What cannot be exported, and why:

* a sharded or quantized lookup module. The graph reads the rows straight from the tables of a
  plain ``EmbeddingCollection`` / ``EmbeddingBagCollection`` (``serving.table_weights``); a
  model trained under ``DistributedModelParallel`` is exported from an unsharded copy with the
  trained state (``from_run``: the checkpoint's shards gathered into plain tables). The
  tables then live in the package: a model whose tables do not fit one host's memory cannot be
  served this way (the eager ``score_request`` over the sharded module serves it).
* The graph with the compiled ``longseq`` operators (``kernel="auto"`` or ``"compiled"``, the
  default where they are built) needs them registered where it is loaded: ``load`` builds them
  (or takes them from the cache) and fails, naming the operators, where they cannot be built.
  ``export(..., kernel="torch")`` writes a graph of torch operators only, which loads anywhere
  torch does (slower: the searches run as torch ops).
* The AOTInductor code is compiled for the CPU it was exported on (its vector instructions):
  export on the machine type that serves.
"""

import json
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.export import Dim

from torchrec_longseq import notices, serving
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.retrieval import extension, kernels
from torchrec_longseq.schema import Attribute, SequenceSchema

FORMAT = 1
PACKAGE = "model.pt2"
METADATA = "serving.json"
GROUPS = ("user", "history", "candidates")


class RequestScorer(nn.Module):
    """``serving.score_shared`` of ``model`` over flat tensors, the module ``torch.export``
    traces.

    Args:
        model (LongSeqCTR): a plain (unsharded) model in eval mode.
        groups (Dict[str, str]): every request key -> ``"user"``, ``"history"`` or
            ``"candidates"`` (the ``Request`` field it belongs to).
    """

    def __init__(self, model: LongSeqCTR, groups: Dict[str, str]) -> None:
        super().__init__()
        self.model = model
        self.groups = dict(groups)

    def forward(self, features: Dict[str, torch.Tensor], request_time: torch.Tensor,
                history_time: Optional[torch.Tensor]) -> torch.Tensor:
        """``features``: key -> ``[n]`` int64 ids (``[L_s]`` for history keys, ``[C]`` for
        candidate keys); ``request_time``: ``[]`` int64; ``history_time``: ``[L]`` int64 or None.
        Returns ``[C]`` logits."""
        parts: Dict[str, Dict[str, torch.Tensor]] = {group: {} for group in GROUPS}
        for key, ids in features.items():
            parts[self.groups[key]][key] = ids
        request = serving.Request(parts["user"], parts["history"], parts["candidates"],
                                  request_time, history_time)  # type: ignore[arg-type]
        return serving.score_shared(self.model, request)


def _schema_to_json(schema: SequenceSchema) -> Dict:
    return {"attributes": [[a.history_key, a.table, a.candidate_key] for a in schema.attributes],
            "time_key": schema.time_key, "hard_search_key": schema.hard_search_key}


def _schema_from_json(data: Dict) -> SequenceSchema:
    return SequenceSchema(attributes=tuple(Attribute(*a) for a in data["attributes"]),
                          time_key=data["time_key"], hard_search_key=data["hard_search_key"])


def _groups(request: serving.Request) -> Dict[str, str]:
    return {key: group for group in GROUPS for key in getattr(request, group)}


def _inputs(request: serving.Request, keys: List[str]) -> tuple:
    """The graph's arguments from a checked request: the keys in the exported order, int64."""
    found = {**request.user, **request.history, **request.candidates}
    features = {key: found[key].long() for key in keys}
    times = request.history_time.long() if request.history_time is not None else None
    return features, torch.tensor(request.request_time, dtype=torch.long), times


def _dynamic_shapes(request: serving.Request, spec: serving.ServingSpec, keys: List[str]):
    """One dimension per sequence for its history keys and timestamps (0 and up), one for every
    other history key (a pooled history, avg-pool), one for the candidates (1 and up); per-user
    features static."""
    dims: Dict[str, Dim] = {}
    dense: Optional[Dim] = None
    for i, schema in enumerate(spec.schemas.values()):
        length = Dim(f"L{i}", min=0)
        for key in schema.history_keys + ([schema.time_key] if schema.time_key else []):
            dims.setdefault(key, length)
        if schema.time_key is None:
            dense = dims[schema.history_keys[0]]
    candidates = Dim("C", min=1)
    shapes = {}
    for j, key in enumerate(keys):
        if key in request.candidates:
            shapes[key] = {0: candidates}
        elif key in request.history:
            shapes[key] = {0: dims.get(key) or Dim(f"H{j}", min=0)}
        else:
            shapes[key] = None
    return shapes, None, None if request.history_time is None else {0: dense or Dim("T", min=0)}


def _too_small(request: serving.Request, spec: serving.ServingSpec) -> Optional[str]:
    """What of ``request`` is too small to trace with dynamic sizes (0 or 1), or None."""
    if request.num_candidates < 2:
        return f"{request.num_candidates} candidates"
    for name, schema in spec.schemas.items():
        n = request.history[schema.history_keys[0]].numel()
        if n < 2:
            return f"{n} behaviors in sequence {name!r}"
    return None


def _longseq_ops(program: torch.export.ExportedProgram) -> List[str]:
    """The ``longseq`` operators the exported graph calls (in its subgraphs too: the no-grad
    region is one)."""
    return sorted({node.target.name() for graph in program.graph_module.modules()
                   if isinstance(graph, torch.fx.GraphModule) for node in graph.graph.nodes
                   if isinstance(node.target, torch._ops.OpOverload)
                   and node.target.namespace == "longseq"})


# third-party notices an export prints that are known to be harmless here, (logger, message):
# TorchRec's on tracing a KJT's to_dict (SIM soft's search-table lookup; slow to trace only),
# torch's is_fx_tracing notice (TorchRec calls it), Inductor's on operators it calls through its
# proxy executor (SDIM's torch.unique)
EXPORT_NOTICES = (("", "Trying to non-strict torch.export KJT to_dict"),
                  ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
                  ("torch._inductor.ir", "is missing a c-shim implementation"))


def export(model: LongSeqCTR, path: Union[str, Path], example: serving.Request,
           kernel: Optional[str] = None, ids: Optional[Union[str, Path]] = None) -> Path:
    """Write the serving artefact of ``model`` to the directory ``path`` (see the module
    docstring) and return it.

    Args:
        model (LongSeqCTR): a plain (unsharded) model; its derived tables are brought up to date
            first. It is put in eval mode and left so.
        path (str | Path): a directory, created (an existing one is replaced).
        example (Request): a request in the layout the model is served with: which keys are
            per user, history or per candidate, and the number of ids of each per-user feature.
            Its lengths are free (it is traced, not stored); it is checked (``check_request``).
        kernel (Optional[str]): the kernels the graph runs (``kernels.KERNELS``); ``None`` keeps
            the model's. ``"torch"``: torch operators only (loads without the compiled
            ``longseq`` operators).
        ids (Optional[str | Path]): a prepared store (``data.prepare``) whose id mappings are
            copied into the artefact (``ids/``: its ``meta.json`` and ``vocab/``), for the
            serving side to map raw ids to rows: ``IdMapping.load(path / "ids", column)``.
    """
    for name, collection in (("sparse_arch", model.sparse_arch),
                             ("sequence_arch.embedding_collection",
                              getattr(model.sequence_arch, "embedding_collection", None))):
        if collection is not None and serving.table_weights(collection) is None:
            raise ValueError(
                f"export: model.{name} is a {type(collection).__name__}, not a plain "
                f"EmbeddingCollection / EmbeddingBagCollection with sum or mean pooling; the "
                f"exported graph reads the rows from its tables (a sharded model: export "
                f"an unsharded copy with its trained state)")
    serving.check_request(example, model)
    spec = serving.ServingSpec.of(model)
    short = _too_small(example, spec)
    if short:
        raise ValueError(f"export: the example request has {short}; torch.export fixes a size "
                         f"of 0 or 1 in its example, so the example needs at least 2 behaviors "
                         f"in every sequence and 2 candidates (any request size is served)")
    model.eval()
    if kernel is not None:
        kernels.set_kernel(model, kernel)
    if model.sequence_arch is not None:
        model.sequence_arch.refresh_pending()
    groups = _groups(example)
    keys = [key for key in groups if key in set(spec.pooled_keys).union(
        *[schema.keys() for schema in spec.schemas.values()])]
    args = _inputs(example, keys)
    out = Path(path)
    with notices.quiet(EXPORT_NOTICES):
        program = torch.export.export(RequestScorer(model, {k: groups[k] for k in keys}), args,
                                      dynamic_shapes=_dynamic_shapes(example, spec, keys),
                                      strict=False)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        torch._inductor.aoti_compile_and_package(program, package_path=str(out / PACKAGE))
    metadata = {
        "format": FORMAT,
        "torch": torch.__version__,
        "keys": [[key, groups[key], None if groups[key] != "user" else args[0][key].numel()]
                 for key in keys],
        "history_time": example.history_time is not None,
        "pooled_keys": spec.pooled_keys,
        "schemas": {name: _schema_to_json(schema) for name, schema in spec.schemas.items()},
        "table_rows": spec.table_rows,
        "longseq_ops": _longseq_ops(program),
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    if ids is not None:
        (out / "ids").mkdir()
        shutil.copy(Path(ids) / "meta.json", out / "ids" / "meta.json")
        if (Path(ids) / "vocab").is_dir():
            shutil.copytree(Path(ids) / "vocab", out / "ids" / "vocab")
    return out


class ExportedModel:
    """A loaded serving artefact (``load``): ``scorer(request) -> [C]`` logits, the request
    checked first as ``score_request`` checks it."""

    def __init__(self, path: Union[str, Path]) -> None:
        path = Path(path)
        metadata = json.loads((path / METADATA).read_text())
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path / METADATA}: format {metadata.get('format')!r}, this "
                             f"version reads format {FORMAT}")
        self.spec = serving.ServingSpec(
            metadata["pooled_keys"],
            {name: _schema_from_json(s) for name, s in metadata["schemas"].items()},
            {key: int(rows) for key, rows in metadata["table_rows"].items()})
        self.keys: List[str] = [key for key, _, _ in metadata["keys"]]
        self.user_sizes = {key: size for key, group, size in metadata["keys"] if group == "user"}
        self.history_time = bool(metadata["history_time"])
        self.longseq_ops: List[str] = metadata["longseq_ops"]
        if self.longseq_ops and not kernels.build():
            raise RuntimeError(
                f"{path}: the exported graph calls the compiled operators "
                f"{self.longseq_ops}, which could "
                f"not be built in this process ({extension.error()}); export with "
                f"kernel='torch' for a machine without a C++ compiler")
        self.runner = torch._inductor.aoti_load_package(str(path / PACKAGE))

    def __call__(self, request: serving.Request) -> torch.Tensor:
        serving.check_request(request, self.spec)  # every key of the graph is present
        found = {**request.user, **request.history, **request.candidates}
        for key, size in self.user_sizes.items():
            ids = found[key]
            if ids.numel() != size:
                raise serving.RequestError(f"user[{key!r}]: the exported graph takes {size} "
                                           f"ids, got {ids.numel()}")
        if request.num_candidates == 0:
            return torch.zeros(0)
        if (request.history_time is not None) != self.history_time:
            raise serving.RequestError(
                "history_time: the exported graph " + ("reads" if self.history_time else
                                                       "does not read") + " the dense timestamps")
        return self.runner(*_inputs(request, self.keys))


def load(path: Union[str, Path]) -> ExportedModel:
    """The serving artefact written by ``export``, ready to score ``Request`` s; needs neither
    the model nor its configuration."""
    return ExportedModel(path)


def from_run(run: Union[str, Path]) -> Tuple[LongSeqCTR, serving.Request]:
    """The trained model of a ``train.py`` run directory, unsharded, and an example request of
    its data: the model built as the run built it (``DIR/config.yaml``) with the state of the
    best validated model (``DIR/best``, ``--early-stop``) or else the last checkpoint
    (``DIR/checkpoint``, ``--checkpoint-every``), loaded with ``torch.distributed.checkpoint``,
    which gathers the ranks' shards into the plain tables; the example is a test batch's first
    sample with at least 2 behaviors in every sequence, with 8 candidates
    (``serving.request_from_batch``)."""
    run = Path(run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: no config.yaml (not a train.py run directory)")
    states = [run / name for name in ("best", "checkpoint") if (run / name / ".metadata").exists()]
    if not states:
        raise FileNotFoundError(f"{run}: no saved model (train with --early-stop or "
                                f"--checkpoint-every N to save one)")
    with notices.quiet(EXPORT_NOTICES), warnings.catch_warnings():
        # torch.distributed.checkpoint's notice that it loads in this one process: the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                category=UserWarning)
        return _from_run(run, states[0])


def _from_run(run: Path, saved: Path) -> Tuple[LongSeqCTR, serving.Request]:
    import torch.distributed.checkpoint as dcp

    from torchrec_longseq import train
    from torchrec_longseq.data.store import SampleStore, StoreDataset, to_batch
    from torchrec_longseq.data.synthetic import SyntheticConfig, SyntheticGenerator
    from torchrec_longseq.models.longseq_ctr import LongSeqCTRTrain

    args = train.parse_args(["--config", str(run / "config.yaml")])
    store = SampleStore(args.data) if args.data else None
    model = train.plain_model(args, train.model_config(args), store)
    wrapped = LongSeqCTRTrain(model, args.alpha, args.beta)
    state = {"model": wrapped.state_dict()}
    dcp.load(state, checkpoint_id=str(saved))
    wrapped.load_state_dict(state["model"])
    model.eval()
    if model.sequence_arch is not None:
        model.refresh_derived_tables()
    if store is None:
        batch = SyntheticGenerator(SyntheticConfig(seed=args.seed, max_seq_len=args.max_seq_len,
                                                   regime=args.regime)).batch("test", 0, 256)
    else:
        batch = to_batch(next(iter(StoreDataset(store, "test", 256, 0, 1).batches())), store)
    spec = serving.ServingSpec.of(model)
    size = batch.request_time.numel()
    for sample in range(size - 7):
        example = serving.request_from_batch(batch, model, sample, 8)
        if _too_small(example, spec) is None:
            return model, example
    raise ValueError(f"{run}: no sample among the first {size} of the test split has 2 behaviors "
                     f"in every sequence (an example request for export needs them)")


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m torchrec_longseq.export RUN_DIR OUT_DIR``: export a ``train.py`` run's model
    (``from_run``) to a serving artefact."""
    import argparse

    p = argparse.ArgumentParser(description="Export a train.py run's model for serving "
                                            "(torch.export + AOTInductor).")
    p.add_argument("run", help="the run directory (train.py --out)")
    p.add_argument("out", help="the artefact's directory (replaced if it exists)")
    p.add_argument("--kernel", choices=list(kernels.KERNELS), default=None,
                   help="torch: torch operators only (loads without the compiled operators)")
    a = p.parse_args(argv)
    model, example = from_run(a.run)
    from torchrec_longseq import train
    store = train.parse_args(["--config", str(Path(a.run) / "config.yaml")]).data
    path = export(model, a.out, example, a.kernel, ids=store)
    ops = json.loads((path / METADATA).read_text())["longseq_ops"]
    print(f"exported to {path} ({sum(f.stat().st_size for f in path.iterdir()) / 2**20:.1f} MB; "
          f"compiled operators: {', '.join(ops) if ops else 'none'})")


if __name__ == "__main__":
    main()
