"""What the workers of the Ray this test process started wrote."""
from pathlib import Path


def worker_stderr() -> str:
    """What this Ray's workers printed on stderr (Ray also forwards it to the driver's terminal)."""
    import ray  # the tests that call this have a Ray up

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*.err")))
