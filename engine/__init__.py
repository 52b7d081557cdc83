"""The generation engine: models, the streaming algorithm and the runtime (docs/ARCHITECTURE.md).

Import submodules explicitly (engine.runtime, engine.dit, ...); this package init stays light so that
`engine.config` can be used without torch.
"""
