"""Everything that touches a TransformerLens model: loading, accessors, the hook door, surgery, positions, readout, interventions.

It imports only the root modules (a ``Prompt`` is taken as ``protocols.Positioned``)."""
