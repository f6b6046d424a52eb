from pacs_node.cli import main

raise SystemExit(main())
