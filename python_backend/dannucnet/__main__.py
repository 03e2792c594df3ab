from dannucnet.cli import entry

entry()
