"""Runs in a bucket: training stopped by SIGTERM (a pre-emption), resumed to the numbers of an
uninterrupted run, analysed and elicited, all on gs://, against a local Cloud Storage server
(tests/gcs_server.py: gcp-storage-emulator); and the run lock as a lock object."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_robustness import ENV1, _cmd, _free_port, _same_run, _signalled

from jaxconcept.train import loop
from jaxconcept import rundir, store

BUCKET = "runs"


@pytest.fixture(scope="module")
def gcs():
    """The URL of a Cloud Storage server on 127.0.0.1 holding an empty bucket BUCKET."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_server.py")), str(port), BUCKET],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "the storage server did not start"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(30)


def _env(url):
    """How each library reaches the server instead of Cloud Storage (docs/outputs.md: Runs in a bucket)."""
    return dict(ENV1,
                STORAGE_EMULATOR_HOST=url,  # gcsfs (etils.epath's gs:// files), google-cloud-storage (the lock)
                TENSORSTORE_GCS_HTTP_URL=url,  # tensorstore (orbax's arrays)
                GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",  # tensorstore: no credentials to look for
                NO_GCE_CHECK="true",  # google-auth, gcsfs: no metadata server to look for
                EPATH_USE_TF="false",  # epath: gcsfs where TensorFlow is installed too (tf.io.gfile has no endpoint)
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")  # gcsfs: no bucket-type query (no control API here)


def _bucket(url):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url})
    return client.bucket(BUCKET)


def _download(url, prefix, dest: Path) -> Path:
    for blob in _bucket(url).client.list_blobs(BUCKET, prefix=prefix + "/"):
        p = dest / blob.name[len(prefix) + 1:]
        p.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(p)
    return dest


def test_a_run_in_a_bucket_is_stopped_resumed_exactly_and_analysed_there(tmp_path, gcs):
    env, run = _env(gcs), f"gs://{BUCKET}/run"
    full = subprocess.Popen(_cmd(tmp_path / "full"), env=ENV1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # the uninterrupted run, locally, meanwhile
    # SIGTERM inside the interval 8 -> 16 (paused before the call 8 -> 12): stopped at 12 after a checkpoint
    proc, err = _signalled(tmp_path, run, signal.SIGTERM, pause_call=3, env=env)
    assert proc.returncode == loop.EXIT_STOPPED, err[-3000:]
    assert "stopped by SIGTERM at step 12 (checkpoint saved)" in err.strip().splitlines()[-1] and "Traceback" not in err
    bucket = _bucket(gcs)
    assert bucket.get_blob("run/.lock") is None and bucket.get_blob("run/checkpoints/12/commit_success.txt")
    # as if the write of step 12 had been cut short (orbax commits a step in a bucket with this
    # marker): the step is moved aside, out of the bucket's checkpoints, and training resumes at 8
    bucket.blob("run/checkpoints/12/commit_success.txt").delete()
    # resumed, then analysed and elicited, in one process (one start of JAX)
    three = ("import sys; from jaxconcept import cli; run = sys.argv[-1]; "
             "sys.exit(cli.main(sys.argv[1:]) or cli.main(['analyze', run]) or cli.main(['elicit', run]))")
    done = subprocess.run([sys.executable, "-c", three, *_cmd(run)[3:]], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "moved to gs://runs/run/checkpoints.bad/12" in done.stderr
    assert bucket.get_blob("run/checkpoints.bad/12/_CHECKPOINT_METADATA") and not bucket.get_blob(
        "run/checkpoints/12/_CHECKPOINT_METADATA")
    assert full.wait(300) == 0, full.stderr.read()[-3000:]
    _same_run(tmp_path / "full", _download(gcs, "run", tmp_path / "copy"))
    assert json.loads(bucket.blob("run/analysis.json").download_as_text())["steps"] == [8, 16, 24]
    assert json.loads(bucket.blob("run/elicit.json").download_as_text())["steps"] == [8, 16, 24]
    assert {b.name for b in bucket.client.list_blobs(BUCKET, prefix="run/figures/")} >= {
        "run/figures/trajectories.png", "run/figures/elicit.png"}


def test_the_run_lock_in_a_bucket(gcs, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    monkeypatch.setattr(store, "LEASE_S", 1.0)  # refreshed every 0.25 s; taken over after 1 s
    run, blob = f"gs://{BUCKET}/locked", _bucket(gcs).blob("locked/.lock")
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    with rundir.lock(run):
        assert blob.download_as_text().strip() == me
        first = _bucket(gcs).get_blob("locked/.lock").generation
        with pytest.raises(rundir.RunDirError, match=f"in use by {me}"):
            with rundir.lock(run):
                pass
        time.sleep(0.6)
        assert _bucket(gcs).get_blob("locked/.lock").generation != first  # refreshed by its holder
    assert not blob.exists()  # removed at exit
    # left by a process of this host that has ended (killed): taken over at once
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    blob.upload_from_string(f"pid {gone.stdout.strip()} on {socket.gethostname()}\n")
    with rundir.lock(run):
        assert blob.download_as_text().strip() == me
    # another host's: refused while it is fresh, taken over once older than the lease
    blob.upload_from_string("pid 1 on another-host\n")
    with pytest.raises(rundir.RunDirError, match="in use by pid 1 on another-host"):
        with rundir.lock(run):
            pass
    time.sleep(1.2)
    with rundir.lock(run):
        assert blob.download_as_text().strip() == me
    assert not blob.exists()
