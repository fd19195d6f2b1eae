"""`python -m persona_fakes.comfyui --port 0`: one fake ComfyUI server in this process."""

from persona_fakes.comfyui.process import main

main()
