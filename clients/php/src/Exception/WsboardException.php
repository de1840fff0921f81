<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** Anything that went wrong talking to wsboard. */
class WsboardException extends \RuntimeException
{
}
