"""Wire protocols: one module per wire (a package where a wire holds several concepts), the
interface in ``base.py``, the list in ``registry.py``.

Protocol modules never call models and never write bytes. Each stream remembers the protocol
it was started in, so a resume renders the rest of it the same way.
"""
