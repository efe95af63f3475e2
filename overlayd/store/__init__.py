"""Control-plane I/O: the etcd adapter (the only importer of aetcd), the
`Store` protocol the rest of overlayd programs against, and the mirror
(the one component that lists and watches etcd).

May import: model, errors, backoff (and `cryptography`, in access.py).
"""
