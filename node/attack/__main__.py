from node.attack.cli import main

raise SystemExit(main())
