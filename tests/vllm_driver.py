"""Runs one vLLM engine in its own process for tests that cannot share the test process
(tensor parallelism, vLLM's multiprocess engine, torch.compile). Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import random


def crash_in_native_code(worker=None) -> None:
    """Read address 0 through ctypes: a SIGSEGV in the worker process, no Python exception."""
    import ctypes

    ctypes.string_at(0)


def stall_background_retrieval(worker=None, rank: int = 0) -> None:
    """On TP rank `rank`, make every background retrieval that starts from now on sleep for an
    hour first (in `stalled_retrieval`, which the stack dumps name): a worker that hangs."""
    import time

    from vllm.distributed import get_tensor_model_parallel_rank

    import ucm.sparse.base as base

    if get_tensor_model_parallel_rank() != rank:
        return

    class StallingExecutor(base.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            def stalled_retrieval():
                time.sleep(3600)
                return fn(*args, **kwargs)

            return super().submit(stalled_retrieval)

    base.ThreadPoolExecutor = StallingExecutor  # the method makes its executor at its first retrieval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="tiny")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--method", default="dense")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--compile", action="store_true", help="torch.compile instead of eager")
    ap.add_argument("--multiprocess", action="store_true", help="vLLM's engine-core process")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--offload", default=None, help="offload mode with a POSIX store in this directory")
    ap.add_argument(
        "--crash-workers",
        action="store_true",
        help="after the engine starts, make every worker crash in native code (a segfault)",
    )
    ap.add_argument("--retrieval-stride", type=int, default=1, help="of the strided methods (default 1)")
    ap.add_argument(
        "--stall-retrieval-rank",
        type=int,
        default=None,
        help="after the engine starts, make this TP rank's background retrievals hang",
    )
    args = ap.parse_args()
    if args.crash_workers or args.stall_retrieval_rank is not None:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc ships a function
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocess else "0"
    if args.tp > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(args.tp))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from ucm.demo import method_config
    from ucm.models import fetch_model, make_tiny_model

    path = str(make_tiny_model() if args.model == "tiny" else fetch_model("smollm2"))
    ktc = None
    if args.method != "dense":
        cfg = method_config(args.method, args.ratio)
        body = next(iter(cfg.values()))
        if "retrieval_stride" in body:
            body["retrieval_stride"] = args.retrieval_stride  # default 1: every step, on the step's own thread
        extra = {"ucm_sparse_config": cfg}
        if args.offload:
            body["offload"] = True
            extra["ucm_connectors"] = [
                {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": args.offload}}
            ]
        ktc = KVTransferConfig(
            kv_connector="UCMConnector",
            kv_connector_module_path="ucm.integration.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    llm = LLM(
        model=path,
        dtype="float32",
        block_size=32,
        max_model_len=2048,
        enforce_eager=not args.compile,
        tensor_parallel_size=args.tp,
        distributed_executor_backend="mp" if args.tp > 1 else "uni",
        kv_transfer_config=ktc,
        seed=0,
    )
    if args.crash_workers:
        llm.collective_rpc(crash_in_native_code)
    if args.stall_retrieval_rank is not None:
        llm.collective_rpc(stall_background_retrieval, args=(args.stall_retrieval_rank,))
    rng = random.Random(0)
    secret = None
    if args.model == "tiny":
        prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1200, 700)]
    else:
        from ucm.demo import needle_prompt

        ids, secret = needle_prompt(llm.get_tokenizer(), 1500, 0.5, seed=3)
        prompts = [ids]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=args.max_tokens, temperature=0)
    )
    print(
        "UCM_DRIVER "
        + json.dumps(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "texts": [o.outputs[0].text for o in outs],
                "secret": secret,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
