"""Start NeuronTune Studio: `python app.py [--model embedded] [--port 7860] [--host 127.0.0.1]`.

The same file runs unchanged as a Hugging Face Space; installed, the same command is `neurontune-studio`."""
from neurontune.studio.serve import main

if __name__ == "__main__":
    main()
