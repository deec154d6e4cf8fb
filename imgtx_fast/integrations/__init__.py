"""Optional integrations with other libraries.

Each submodule imports its third-party library when it is imported itself, never at
``import imgtx_fast`` time, so the core package needs none of them:

    from imgtx_fast.integrations.diffusers import FastVQDiffusionScheduler   # needs diffusers
"""
