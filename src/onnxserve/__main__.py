from onnxserve.cli import main

main()
