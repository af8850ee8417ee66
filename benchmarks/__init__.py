"""bench.py's parts beside grafito's own rows: how rows are measured (measure.py), what a peer
is (peer.py; worker.py runs one in a child process), the peers (one module each, named for
what grafito is compared with) and the serve load test (serve_load.py).

A new peer is a module here with a Peer subclass, and one line in PEERS: its --compare value.
"""

from benchmarks.llamacpp_peer import LlamaCppPeer
from benchmarks.transformers_peer import TransformersPeer
from benchmarks.trl_peer import TrlPeer

PEERS = {
    "hf": TransformersPeer,  # transformers: training steps, generation, serve
    "trl": TrlPeer,  # TRL's DPOTrainer: DPO steps
    "llamacpp": LlamaCppPeer,  # llama.cpp (llama-cpp-python) on the GGUF export, f16 and q8_0: batch-1 generation
}
