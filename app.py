"""`python app.py [--model PATH_OR_HUB_ID_OR_PRESET] [--db URL] [--data-dir DIR] [--host H] [--port P]
[--share] [--device D] [--dtype T]`: serve the SPHINX-X web app (a Hugging Face Space runs this file)."""
import sys

try:  # ZeroGPU Spaces: `spaces` must be imported before torch touches CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

from app.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
