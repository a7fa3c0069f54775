"""``rlfuse bench --op token_logprobs --vocab-parallel W``: token log-probs + entropy with the logits split
over the vocabulary across ``W`` ranks (``rlfuse.ShardedLogits``), next to the unsharded op.

The unsharded op runs first in this process; then ``W`` processes join one ``torch.distributed`` group
(gloo on CPU, NCCL on GPUs: rank ``r`` on ``cuda:r``, so ``W`` GPUs are needed) and each times the same
phases as every bench op (``fwd``, ``bwd``, ``fwd+bwd``: median of ``--repeats`` after ``--warmup``),
the ranks lined up by a barrier before every timed run. Every process uses the same number of threads
(``--threads``, default ``cpu_count // W``): the baseline is one rank's process holding the whole
vocabulary. Each rank's shard is its columns (``V / W``, the first ``V mod W`` ranks one more) of the
same ``[N, V]`` logits the baseline gets. The forward builds the ``ShardedLogits`` (as a trainer does
once per step) and calls ``rlfuse.token_logprobs(src, tokens, return_entropy=True)``.

Communication is measured, not assumed: every ``torch.distributed`` collective a rank calls is
wrapped and its tensors counted during one forward and one backward. Reported per rank: the number
of collectives, the payload (the bytes the rank contributes: the all-reduced / all-gathered /
broadcast tensor) and the wire estimate of a ring (all-reduce ``2 (W - 1) / W`` x payload, all_gather
``(W - 1)`` x payload received). docs/sharded.md's formula for this call, ``20 N + 120`` B of payload
in the forward (layout all_gather of 14 int64, the token-range check's agreement of 1 int64, MAX of
``lse_r`` 4 B and SUM of 4 floats 16 B per token) and none in the backward, is checked against the count.

Table on stdout; CSV and environment JSON in ``--out`` (``token_logprobs_vocab_parallel_<device>_<time>``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback

import torch

from .harness import (DTYPE_NAMES, PHASES, Draws, Inputs, _format_bytes, _format_table, _run_once, _sanitize,
                      environment, log, rlfuse_backends, short_error)

SUPPORTED_OPS = ("token_logprobs",)
GROUP_TIMEOUT_S = 300
CSV_COLUMNS = ["op", "device", "device_name", "tokens", "vocab", "dtype", "world_size", "contender", "rank",
               "local_vocab", "threads", "repeats", "fwd_ms", "bwd_ms", "fwd+bwd_ms", "collectives_fwd",
               "collectives_bwd", "payload_bytes_fwd", "payload_bytes_bwd", "wire_bytes_fwd", "wire_bytes_bwd",
               "formula_bytes_fwd", "logits_bytes", "error"]


def formula_payload_bytes(tokens: int, world: int) -> int:
    """docs/sharded.md: bytes each rank contributes in one forward of ``token_logprobs(ShardedLogits(...))``
    through the public function: the layout all_gather (14 int64), the data checks' agreement (1 int64),
    the MAX of ``lse_r`` (4 B per token) and the SUM of ``[A, B, C, Q]`` (16 B per token)."""
    del world  # the payload per rank does not depend on the world size
    return 14 * 8 + 8 + 20 * tokens


def shard_columns(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """(start, size) of rank ``rank``'s columns: ``V // W``, the first ``V % W`` ranks one more."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


# --- counting the collectives -------------------------------------------------------------------------


class CollectiveCounter:
    """Wraps ``torch.distributed``'s collectives (as called through the module, which is how rlfuse
    calls them) and counts, while ``counting``, the calls, the payload bytes and a ring's wire bytes."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single", "barrier")

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.counting = False
        self.reset()
        self._originals = {}
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))

    def reset(self) -> None:
        self.calls, self.payload, self.wire = 0, 0, 0.0

    def restore(self) -> None:
        for name, original in self._originals.items():
            setattr(self.dist, name, original)

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.counting and name != "barrier":
                self._count(name, args, kwargs)
            return original(*args, **kwargs)

        counted.__wrapped__ = original
        return counted

    def _count(self, name, args, kwargs) -> None:
        group = kwargs.get("group")
        world = self.dist.get_world_size(group)
        if name == "all_gather":  # all_gather(tensor_list, tensor)
            tensor = args[1] if len(args) > 1 else kwargs["tensor"]
        elif name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
            tensor = args[1] if len(args) > 1 else kwargs["input_tensor" if "input_tensor" in kwargs else "input"]
        else:
            tensor = args[0] if args else kwargs["tensor"]
        nbytes = tensor.numel() * tensor.element_size()
        self.calls += 1
        self.payload += nbytes
        if name == "all_reduce":
            self.wire += 2 * (world - 1) / world * nbytes
        elif name in ("all_gather", "all_gather_into_tensor"):
            self.wire += (world - 1) * nbytes
        else:
            self.wire += nbytes


# --- one rank -----------------------------------------------------------------------------------------


def _inputs(args, device, dtype, columns=None) -> Inputs:
    """The token_logprobs case's inputs (the same draws as ``--op token_logprobs``); ``columns``: keep
    only that ``(start, size)`` slice of the logits (this rank's shard)."""
    draw = Draws(args, device)
    logits, tokens = draw.logits(dtype, requires_grad=False), draw.tokens()
    g_logp, g_entropy = draw.normal(args.tokens), draw.normal(args.tokens)
    if columns is not None:
        start, size = columns
        logits = logits[:, start:start + size].clone()
    logits.requires_grad_(True)
    return Inputs({"logits": logits, "tokens": tokens}, [logits], [g_logp, g_entropy])


def _time_phases(forward, make_inputs, args, device, before_each=None) -> dict:
    """{phase: median ms} after ``--warmup`` fwd+bwd calls; ``before_each()`` runs before every call."""
    inp = make_inputs()
    for _ in range(max(1, args.warmup)):
        if before_each:
            before_each()
        _run_once("fwd+bwd", forward, inp, device)
    ms = {}
    for phase in PHASES:
        times = []
        for _ in range(args.repeats):
            if before_each:
                before_each()
            times.append(_run_once(phase, forward, inp, device))
        ms[phase] = statistics.median(times)
    return ms


def _rank_main(rank: int, world: int, port: int, spec: dict, result_dir: str) -> None:
    import torch.distributed as dist

    import rlfuse

    args = argparse.Namespace(**spec["args"])
    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    counter = CollectiveCounter()
    rows = []
    columns = shard_columns(args.vocab, world, rank)
    for dtype_name in spec["dtypes"]:
        dtype = getattr(torch, dtype_name)
        for backend in spec["backends"]:
            row = {"dtype": DTYPE_NAMES[dtype], "backend": backend, "rank": rank, "local_vocab": columns[1]}
            try:
                def forward(inp, backend=backend):
                    src = rlfuse.ShardedLogits(inp.tensors["logits"])
                    return rlfuse.token_logprobs(src, inp.tensors["tokens"], return_entropy=True, backend=backend)

                def make_inputs(dtype=dtype):
                    return _inputs(args, device, dtype, columns)

                row["ms"] = _time_phases(forward, make_inputs, args, device, before_each=dist.barrier)
                # One counted forward and one counted backward.
                inp = make_inputs()
                dist.barrier()
                counter.reset()
                counter.counting = True
                outputs = forward(inp)
                counter.counting = False
                row["fwd"] = (counter.calls, counter.payload, counter.wire)
                counter.reset()
                counter.counting = True
                torch.autograd.backward(list(outputs), inp.upstream)
                counter.counting = False
                row["bwd"] = (counter.calls, counter.payload, counter.wire)
            except Exception as exc:  # noqa: BLE001 -- reported in the table
                counter.counting = False
                row["error"] = short_error(exc)
                row["traceback"] = traceback.format_exc()
            rows.append(row)
    counter.restore()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, spec: dict, timeout_s: float) -> tuple[dict, str | None]:
    """{rank: rows} from ``world`` spawned ranks, and an error message if one of them failed."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.spawn(_rank_main, args=(world, _free_port(), spec, result_dir), nprocs=world, join=False)
        deadline = time.monotonic() + timeout_s
        error = None
        while True:
            try:
                if context.join(timeout=1):
                    break
            except Exception as exc:  # noqa: BLE001 -- a rank died
                error = short_error(exc)
                break
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                error = f"the {world} ranks did not finish within {timeout_s:.0f} s"
                break
        results = {}
        for rank in range(world):
            path = os.path.join(result_dir, f"rank{rank}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results[rank] = json.load(f)
    return results, error


# --- the command --------------------------------------------------------------------------------------


def run(args: argparse.Namespace, device: torch.device) -> int:
    """``rlfuse bench --vocab-parallel W`` (``args`` already resolved by ``bench._resolve``); exit status."""
    import rlfuse

    world = args.vocab_parallel
    if args.op not in SUPPORTED_OPS:
        print(f"rlfuse bench: --vocab-parallel supports --op {', '.join(SUPPORTED_OPS)}, not {args.op}",
              file=sys.stderr)
        return 2
    if world < 1:
        print("rlfuse bench: --vocab-parallel must be at least 1", file=sys.stderr)
        return 2
    if args.vocab < world:
        print(f"rlfuse bench: --vocab {args.vocab} cannot be split over {world} ranks", file=sys.stderr)
        return 2
    if device.type == "cuda" and torch.cuda.device_count() < world:
        print(f"rlfuse bench: --vocab-parallel {world} on CUDA needs {world} GPUs (NCCL: one rank per GPU), "
              f"found {torch.cuda.device_count()}; use --device cpu for gloo ranks", file=sys.stderr)
        return 2
    notes: list[str] = []
    backends = rlfuse_backends(args, device, notes)
    if not backends:
        print("rlfuse bench: no rlfuse kernel backend to benchmark", file=sys.stderr)
        return 2
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    env = environment(device, args)
    device_label = (env["device_name"] if device.type == "cuda"
                    else f"cpu: {env['cpu_model']}, {threads} thread(s) per process")
    log(f"rlfuse bench: token_logprobs + entropy, unsharded and split over {world} "
        f"{'NCCL' if device.type == 'cuda' else 'gloo'} ranks, on {device_label}; backends {', '.join(backends)}")

    table = []  # one dict per (dtype, backend, contender)
    for dtype in args.dtypes:
        for backend in backends:
            row = dict(dtype=DTYPE_NAMES[dtype], contender=f"rlfuse {backend} unsharded", rank="",
                       local_vocab=args.vocab)
            log(f"  unsharded {backend} {DTYPE_NAMES[dtype]} ...", end="")
            try:
                def forward(inp, backend=backend):
                    return rlfuse.token_logprobs(inp.tensors["logits"], inp.tensors["tokens"], return_entropy=True,
                                                 backend=backend)

                row["ms"] = _time_phases(forward, lambda dtype=dtype: _inputs(args, device, dtype), args, device)
                row["fwd"] = row["bwd"] = (0, 0, 0.0)
                log(f" {row['ms']['fwd+bwd']:.3f} ms fwd+bwd")
            except Exception as exc:  # noqa: BLE001
                row["error"] = short_error(exc)
                log(f" error: {row['error']}")
            table.append(row)
    torch.set_num_threads(previous_threads)

    log(f"  spawning {world} ranks ...")
    spec = dict(args={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
                threads=threads, device=device.type, dtypes=[str(d).removeprefix("torch.") for d in args.dtypes],
                backends=backends)
    timeout_s = 120 + 4 * (args.warmup + 3 * args.repeats) * len(args.dtypes) * len(backends) * max(
        1.0, args.tokens * args.vocab / 2**26)
    ranks, spawn_error = _spawn(world, spec, timeout_s)
    failed = spawn_error is not None
    for i, (dtype, backend) in enumerate((d, b) for d in args.dtypes for b in backends):
        for rank in range(world):
            rows = ranks.get(rank)
            row = dict(dtype=DTYPE_NAMES[dtype], contender=f"rlfuse {backend} rank {rank}/{world}", rank=rank,
                       local_vocab=shard_columns(args.vocab, world, rank)[1])
            if rows is None or i >= len(rows):
                row["error"] = spawn_error or "no result"
            else:
                row.update({k: v for k, v in rows[i].items() if k in ("ms", "fwd", "bwd", "error")})
                if "traceback" in rows[i]:
                    log(rows[i]["traceback"])
            failed = failed or "error" in row
            table.append(row)
    failed = failed or any("error" in row for row in table)

    formula = formula_payload_bytes(args.tokens, world)
    for row in table:
        row["formula"] = formula if row["rank"] != "" else 0
    _print(args, world, device_label, device, table, formula, notes)
    if not args.no_save:
        _save(args, world, device, env, table, threads)
    return 1 if failed else 0


def _print(args, world, device_label, device, table, formula, notes) -> None:
    print(f"token_logprobs + entropy, vocab-parallel over {world} ranks "
          f"({'NCCL' if device.type == 'cuda' else 'gloo'}), N={args.tokens} V={args.vocab}  |  {device_label}")
    print(f"median of {args.repeats} runs per rank (ranks lined up by a barrier before each run); "
          f"bytes per rank: payload = tensors the rank contributes, wire = ring estimate")
    print()
    headers = ["contender", "dtype", "V local", "fwd ms", "bwd ms", "fwd+bwd ms", "collectives fwd/bwd",
               "payload fwd/bwd", "wire fwd/bwd"]
    rows = []
    for row in table:
        cells = [row["contender"], row["dtype"], str(row["local_vocab"])]
        if "ms" in row:
            cells += [f"{row['ms'][p]:.3f}" for p in PHASES]
        else:
            cells += ["error"] * 3
        if "fwd" in row:
            (cf, pf, wf), (cb, pb, wb) = row["fwd"], row["bwd"]
            cells += [f"{cf}/{cb}", f"{_format_bytes(pf)} / {_format_bytes(pb)}",
                      f"{_format_bytes(wf)} / {_format_bytes(wb)}"]
        else:
            cells += ["-", "-", row.get("error", "")]
        rows.append(cells)
    print(_format_table(rows, headers, right={2, 3, 4, 5, 6, 7, 8}))
    measured = {tuple(row["fwd"][1:2]) + (row["bwd"][1],) for row in table if row["rank"] != "" and "fwd" in row}
    if measured:
        match = measured == {(formula, 0)}
        print()
        print(f"communication per rank and call: formula (docs/sharded.md) 20 B x N + 120 B = {formula} B in the "
              f"forward, 0 in the backward; measured {sorted(measured)}: {'match' if match else 'MISMATCH'}")
    for note in notes:
        print(f"note: {note}")


def _save(args, world, device, env, table, threads) -> None:
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    stem = os.path.join(args.out, f"token_logprobs_vocab_parallel{world}_{_sanitize(env['device_name'])}_{stamp}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in table:
            fwd, bwd = row.get("fwd", ("", "", "")), row.get("bwd", ("", "", ""))
            writer.writerow({
                "op": "token_logprobs", "device": device.type, "device_name": env["device_name"],
                "tokens": args.tokens, "vocab": args.vocab, "dtype": row["dtype"], "world_size": world,
                "contender": row["contender"], "rank": row["rank"], "local_vocab": row["local_vocab"],
                "threads": threads, "repeats": args.repeats,
                **{f"{p}_ms": round(row["ms"][p], 4) if "ms" in row else "" for p in PHASES},
                "collectives_fwd": fwd[0], "collectives_bwd": bwd[0], "payload_bytes_fwd": fwd[1],
                "payload_bytes_bwd": bwd[1], "wire_bytes_fwd": round(fwd[2]) if fwd[2] != "" else "",
                "wire_bytes_bwd": round(bwd[2]) if bwd[2] != "" else "", "formula_bytes_fwd": row["formula"],
                "logits_bytes": args.tokens * row["local_vocab"] * torch.tensor([], dtype=getattr(
                    torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[row["dtype"]])).element_size(),
                "error": row.get("error", ""),
            })
    env.update(op="token_logprobs", vocab_parallel=world, threads_per_process=threads,
               shape={"tokens": args.tokens, "vocab": args.vocab}, dtypes=[DTYPE_NAMES[d] for d in args.dtypes],
               command=sys.argv)
    with open(stem + "_env.json", "w") as f:
        json.dump(env, f, indent=2, default=str)
    print()
    print(f"wrote {stem}.csv, {stem}_env.json")
