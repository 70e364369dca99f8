"""DINOSeg in the browser: a trame-slicer front-end on the same Qt-free DINOSegLib and ``dinomed`` children.

The web server runs in its own small environment (trame-slicer + slicer-core, no torch; ``scripts/web_env.sh``);
the heavy work runs in ``dinomed`` child processes of the project's main environment (``--dinomed-python``).
"""
