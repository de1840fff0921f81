<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** No wsboard answers at the control socket path. */
final class UnreachableException extends WsboardException
{
}
