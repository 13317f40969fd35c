"""The command-line programs: ``ntkdfl-train``, ``ntkdfl-compare``, ``ntkdfl-byzantine`` and
``ntkdfl-selection`` (``[project.scripts]``); ``python launchers/<name>.py`` runs the same.

Each parses flags (``ntkdfl_tf.cli.flags``) and calls one library function.
"""
