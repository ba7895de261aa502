"""Checkpoint conversion between HF/torch/PEFT and GGUF, and quantization.

Public entry points (each raises convert.errors.ConvertError and never leaves a partial output):
    convert.hf_to_gguf.hf_to_gguf(src, dst, out_type="f32")       HF folder -> GGUF (f32/f16/bf16/quantized)
    convert.gguf_to_hf.gguf_to_hf(src, dst)                       GGUF -> HF folder (fp32 safetensors)
    convert.lora.peft_to_gguf(src, dst, base)                     PEFT folder -> llama.cpp LoRA GGUF
    convert.lora.gguf_to_peft(src, dst, base=None)                llama.cpp LoRA GGUF -> PEFT folder
    convert.lora_gguf.write_lora_gguf / read_lora_gguf / lora_row_perms   numpy only, for the edge
    convert.quantize.quantize_gguf(src, dst, qtype)               llama.cpp quantization
    convert.cli.convert(src, dst, out_type=None, base=None)       what ``edgezo convert`` runs
Nothing here imports torch at module level.
"""
