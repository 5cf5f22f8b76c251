"""Several ranks, several nodes: before anything is written, every rank must see the same out_dir and its own
copy of the same data (docs/multinode.md).

Each check below is collective, so a problem seen on one node only is raised on every rank (rank 0 prints
it) instead of one rank failing while the others wait in a collective.
"""
import secrets
import time
from dataclasses import replace

from trainer.errors import UserError
from trainer.launcher import node_name
from trainer.run.ranks import all_gather_objects, barrier

SHARED_MARKER = ".shared-check-"


def sees_marker(marker, token, wait_s=2.0):
    """Whether this rank reads rank 0's token back (a short wait for a network filesystem's caches)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return marker.read_text() == token
        except OSError:
            if time.time() > deadline:
                return False
        time.sleep(0.2)


def check_shared_out_dir(out_dir, rank, world):
    """Several ranks: every rank must see the out_dir rank 0 writes (resuming needs every rank's part).

    Rank 0 writes a marker named by a random token into out_dir; after a barrier each rank reads it
    back and one all-gather compares what every rank saw. The marker is the only thing written before
    the inputs are checked: rank 0 removes it, and the folders it created to hold it, whatever the
    outcome (claim_out_dir creates out_dir for good once every input is known good).
    """
    if world == 1:
        return
    token = all_gather_objects(secrets.token_hex(16))[0]  # rank 0's token, on every rank
    marker = out_dir / f"{SHARED_MARKER}{token}"
    created, error = [], None
    if rank == 0:
        created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        except OSError as exc:
            error = (f"cannot write into out_dir {out_dir} ({exc.strerror or exc}); "
                     f"choose an --out_dir every node can write")
    barrier()
    views = all_gather_objects((node_name(), error, error is None and sees_marker(marker, token)))
    if rank == 0:
        marker.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
    if views[0][1] is not None:  # rank 0 could not write the marker
        raise UserError(views[0][1])
    blind = [node for node, _, seen in views if not seen]
    if blind:
        raise UserError(f"out_dir {out_dir} is not shared between nodes: {blind[0]} does not see the file rank 0 "
                        f"wrote there, so no node could resume the checkpoints; put out_dir on a filesystem every "
                        f"node mounts at the same path (NFS, Lustre, ...)")


def on_every_rank(check, *args):
    """check(*args) on every rank; a UserError on any rank is raised on all of them (rank 0 prints it).

    The same mistake on every rank keeps its own line; a failure on some nodes only (a dataset missing
    on one node) is named with the node.
    """
    try:
        result, error = check(*args), None
    except UserError as exc:
        result, error = None, str(exc)
    seen = all_gather_objects((node_name(), error))
    failed = [(node, message) for node, message in seen if message is not None]
    if not failed:
        return result
    if len(failed) == len(seen):
        raise UserError(error)
    node, message = failed[0]
    raise UserError(f"on {node} only: {message} (every node must see the same files: prepare the data on every "
                    f"node or put data_dir on a filesystem every node shares)")


def data_signature(data):
    """What must be equal on every node: each dataset's name, vocabulary and token counts."""
    return [(p.names[0], p.vocab_size, len(p.tokens["train"]), len(p.tokens["val"]))
            for p in getattr(data, "parts", [data])]


def check_same_data(data):
    seen = all_gather_objects((node_name(), data_signature(data)))
    for node, signature in seen[1:]:
        if signature != seen[0][1]:
            def show(sig):
                return "; ".join(f"{n}: vocab {v}, {t:,} train and {w:,} val tokens" for n, v, t, w in sig)
            raise UserError(f"the dataset differs between nodes ({seen[0][0]} has {show(seen[0][1])}, {node} has "
                            f"{show(signature)}); prepare it once and copy it to every node, or put data_dir on a "
                            f"filesystem every node shares")


def same_hardware(hw):
    """The plan must be the same on every rank: plan for the smallest memory any rank reports."""
    seen = all_gather_objects((hw.bytes_per_device, hw.bf16))
    return replace(hw, bytes_per_device=min(b for b, _ in seen), bf16=all(bf16 for _, bf16 in seen))
