<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** The control socket refused this user (file mode, --control-uids, --control-gids). */
final class PermissionDeniedException extends WsboardException
{
}
