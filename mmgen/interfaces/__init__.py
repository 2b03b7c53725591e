"""Image interfaces: how image tokens enter and leave the backbone.

The contract is `base.ImageInterface`; the registry of named interfaces is `registry.INTERFACES`.
"""
