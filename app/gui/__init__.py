"""The PyQt6 + pyqtgraph GUI (the only package that imports Qt).

Qt-free parts (models, readers, the backend adapter) can be imported and tested without a
display; the widgets live in ``setup_window``, ``monitor_window``, ``gallery``, ``plots``.
Nothing happens at import.
"""
