"""A small web page to search an index of photos: type a description, see the photos.

    python -m dualencoder.apps.serve --index_dir ~/pictures.index
    # then open http://127.0.0.1:8000/

Plain HTML from the standard library's `http.server`, no JavaScript: `/?q=TEXT` lists the best
matches of a description, `/?like=N` the photos most like indexed photo N (each result links to
it), `/photo/N` serves indexed photo N. Only indexed files are ever served, and the server listens
on 127.0.0.1 only: it is a tool for one person on their own machine, not a public site.
"""

from __future__ import annotations

import argparse
import html
import logging
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional, Sequence
from urllib.parse import parse_qs, quote, urlparse

from dualencoder.apps.query import PhotoSearch, add_search_arguments

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"
MAX_TOP_K = 200

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Search your photos</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
.hits {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: 200px; }}
figure img {{ width: 200px; height: 200px; object-fit: cover; background: #eee; }}
figcaption {{ font-size: 0.8em; word-break: break-all; }}
</style></head>
<body>
<h1>Search your photos</h1>
<form method="get" action="/">
<input type="text" name="q" id="q" size="50" value="{query}" placeholder="a dog running on the beach" autofocus>
<input type="number" name="k" id="k" min="1" max="{max_k}" value="{top_k}">
<button type="submit" id="search">Search</button>
</form>
<p id="status">{status}</p>
<div class="hits">{hits}</div>
</body></html>
"""

HIT = ('<figure><a href="/?like={row}&amp;k={top_k}"><img src="/photo/{row}" alt="{name}"></a>'
       '<figcaption>{score:.3f} {name}</figcaption></figure>')


def render_page(search: PhotoSearch, params: dict) -> str:
    """The page for query parameters `q` (text) or `like` (an indexed photo's row), `k` (how many)."""
    query = params.get("q", [""])[0].strip()
    try:
        top_k = min(max(int(params.get("k", ["12"])[0]), 1), MAX_TOP_K)
    except ValueError:
        top_k = 12
    hits, status = [], f"{len(search.paths)} photos indexed."
    if query:
        hits = search.by_text(query, top_k)
        status = f"Best {len(hits)} of {len(search.paths)} photos for \u201c{query}\u201d."
    elif params.get("like"):
        try:
            row = int(params["like"][0])
            hits = search.by_row(row, top_k)
            status = f"Photos like {search.paths[row].name}."
        except (ValueError, IndexError):
            status = "No such photo in the index."
    cards = "".join(HIT.format(row=row, top_k=top_k, name=html.escape(str(path.name)), score=score)
                    for row, path, score in hits)
    return PAGE.format(query=html.escape(query), max_k=MAX_TOP_K, top_k=top_k, status=html.escape(status), hits=cards)


def make_handler(search: PhotoSearch):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/":
                self._send(200, "text/html; charset=utf-8", render_page(search, parse_qs(url.query)).encode())
            elif url.path.startswith("/photo/"):
                self._send_photo(url.path[len("/photo/"):])
            else:
                self._send(404, "text/plain", b"not found")

        def _send_photo(self, row: str):
            if not row.isdigit() or int(row) >= len(search.paths):
                self._send(404, "text/plain", b"no such photo")
                return
            path = search.paths[int(row)]
            try:
                body = path.read_bytes()
            except OSError:
                self._send(404, "text/plain", f"{quote(path.name)} is gone; run the index command again".encode())
                return
            self._send(200, mimetypes.guess_type(path.name)[0] or "application/octet-stream", body)

        def _send(self, status: int, content_type: str, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one line per request at debug level, not on stderr
            logger.debug("%s " + format, self.address_string(), *args)

    return Handler


def make_server(search: PhotoSearch, port: int = 8000) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0: any free port; the chosen one is `server.server_address[1]`)."""
    return ThreadingHTTPServer((HOST, port), make_handler(search))


def serve(server: ThreadingHTTPServer, stop_after: Optional[float] = None) -> None:
    """Serve until interrupted, or for `stop_after` seconds at most."""
    timer = threading.Timer(stop_after, server.shutdown) if stop_after else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if timer is not None:
            timer.cancel()
        server.server_close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dualencoder.apps.serve", description=__doc__.split("\n\n")[0],
                                     epilog="Listens on 127.0.0.1 only. Stop it with Ctrl-C.")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default: 8000; 0: any free port)")
    parser.add_argument("--stop_after", type=float, default=None, help="stop by itself after this many seconds")
    add_search_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    search = PhotoSearch(args.index_dir, args.model_dir, args.backend, args.device, args.search)
    server = make_server(search, args.port)
    print(f"Search {len(search.paths)} photos at http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    serve(server, args.stop_after)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main()
