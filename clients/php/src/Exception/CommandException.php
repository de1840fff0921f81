<?php

declare(strict_types=1);

namespace Wsboard\Exception;

/** The server refused the command; the message says why. */
final class CommandException extends WsboardException
{
}
