"""The embedded toy default: a procedurally drawn dataset, a small trained tokenizer and classifier.

Everything here exists so that ``python -m rear_ds.demo`` can run the real pipeline (tokenize ->
deepspeed training -> export -> sampling -> evaluation) on a laptop-class CPU in minutes, with a number
(class consistency) that shows whether the model learned the classes.
"""
