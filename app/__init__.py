"""The Gradio app: Chat, Grounding, Set-of-Mark, Document OCR and History over one model service.

    settings.py   flags + environment twins
    service.py    THE model service (load once, generate, stream, cancel)
    records.py    the app's use of the store (turns, feedback, history), owner-scoped
    render.py     boxes, points and marks drawn with supervision on the original image
    documents.py  PDFs through PyMuPDF (pages, caps, text layer)
    proposals.py  OpenCV region proposals for Set-of-Mark
    handlers/     one module per tab: plain functions and dataclasses, no gr.* components
    ui.py         one gr.Blocks layout + event wiring
    launch.py     queue settings and launch (also on a free port, for tests)

Imports flow one way: app -> sphinx_model, storage.
"""
