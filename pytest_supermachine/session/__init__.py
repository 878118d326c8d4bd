"""The plugin's per-session plumbing: settings, the session's state, its counters, xdist.

`settings` resolves options (marker > CLI > env > ini); `state` is what one pytest
process keeps in ``config.stash``; `stats` counts what the plugin did; `xdist` makes
the workers of one run agree on the session and sums their counts in the controller.
"""
