"""The Gradio app: Chat, Grounding, Set-of-Mark, Document OCR and History over one model service.

    settings.py   flags + environment twins (AppSettings, parse_settings)
    service.py    THE model service: load once, stream / generate / check / cancel requests
    zerogpu.py    spaces.GPU around model calls when the `spaces` package imports
    records.py    the app's use of the store (images, turns, feedback, history), owner-scoped
    regions.py    boxes and points in model text -> original-image pixels
    render.py     boxes, points and marks drawn with supervision on the original image
    documents.py  PDFs through PyMuPDF (caps, encryption, pages, text layer, similarity)
    proposals.py  OpenCV region proposals for Set-of-Mark
    examples.py   the tabs' clickable examples (assets/examples/)
    handlers/     one module per tab + the flat API: plain functions and dataclasses, no gr.* components
    wiring.py     event options and error reporting; tabs.py the five tabs; ui.py build_demo
    launch.py     build the context, launch (also in the background on a free port, for tests)
    main.py       the entry point behind app.py

Imports flow one way: app -> sphinx_model, storage.
"""
