"""Reference (a) of bench_serve: the naive server a user writes first. One HTTP request at a time
through `model.generate` (a global lock), streamed token by token with transformers'
TextIteratorStreamer as OpenAI completion chunks. Standard library HTTP server, no batching.

    python benchmarks/naive_server.py MODEL_DIR PORT
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

LOCK = threading.Lock()


def make_handler(model, tokenizer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection closes

        def log_message(self, *args):
            pass

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = tokenizer(req["prompt"], return_tensors="pt")
            n = int(req.get("max_tokens", 16))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            with LOCK:
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
                kwargs = dict(**ids, max_new_tokens=n, min_new_tokens=n if req.get("ignore_eos")
                              else 0, do_sample=False, streamer=streamer,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
                worker = threading.Thread(target=_generate, args=(model, kwargs))
                worker.start()
                for text in streamer:
                    if text:
                        self._chunk({"choices": [{"index": 0, "text": text}]})
                worker.join()
            usage = {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": n}
            self._chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                         "usage": usage})  # fmt: skip
            self.wfile.write(b"data: [DONE]\n\n")

        def _chunk(self, body: dict) -> None:
            self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
            self.wfile.flush()

    return Handler


def _generate(model, kwargs) -> None:
    with torch.inference_mode():
        model.generate(**kwargs)


def main() -> None:
    model_dir, port = sys.argv[1], int(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ThreadingHTTPServer.request_queue_size = 256  # accept all 32 concurrent connections
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(model, tokenizer))
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
