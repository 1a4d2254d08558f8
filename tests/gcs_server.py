"""A local Google Cloud Storage server for the tests: gcp-storage-emulator (from PyPI), in memory,
with one bucket, on 127.0.0.1:PORT (the first argument; the second names the bucket).

One addition to the emulator: downloads carry the object's generation in the x-goog-generation
and x-goog-metageneration headers, as Cloud Storage's do. Tensorstore (orbax's array writer)
reads a manifest's generation from them to update it under a precondition; without them it
fails with "Malformed StorageGeneration". The emulator ignores preconditions (ifGenerationMatch):
what rests on them (the lock's exclusion of a second writer) is not checked against it.
"""
import sys
import threading

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    except NotFound:
        pass  # the emulator's own handler answers 404
    return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routes from it

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
    server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
    server.start()
    threading.Event().wait()  # until the test ends the process
